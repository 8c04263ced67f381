"""What one upload may make: its stored footprint, bounded by its own size.

Every row an import writes is charged as it is written: a result as the line PostgreSQL's
COPY reads (every column as text, its metadata as JSON), an artifact as its content, name and
fixed columns, the run as its metadata. The total may not pass IBUTSU_IMPORT_MAX_FOOTPRINT_RATIO
times the upload's size (the report, unpacked for an archive, and the uploader's metadata)
plus ROW_BYTES per row, for the ids, times and outcome every row holds however little the
report says, plus FLOOR, so that no small report is ever near it. A report's own content is
stored about once; what multiplies it is a value copied into every result (a suite's file, the
uploader's metadata), which a crafted report repeats into as many results as it likes: over
the budget, the import is refused with the reason and its transaction rolled back, having
written nothing.
"""

from __future__ import annotations

from ibutsu_server.settings import ImportLimits
from ibutsu_worker.importing.errors import ReportError

# What a result row holds whatever its report says: three ids, its run in its metadata, a
# start time and an outcome, as COPY text (about 240 bytes).
ROW_BYTES = 256
FLOOR = 64 * 1024


class Budget:
    """The bytes one import may store, charged row by row as they are written."""

    def __init__(self, limits: ImportLimits, upload_bytes: int) -> None:
        self.limits = limits
        self.upload_bytes = upload_bytes
        self.stored = 0
        self.rows = 0
        self._allowed = limits.max_footprint_ratio * upload_bytes + FLOOR

    def charge(self, size: int, rows: int = 1) -> None:
        """Count ``size`` bytes written in ``rows`` rows; ReportError once over budget."""
        self.stored += size
        if rows:
            self.rows += rows
            self._allowed += ROW_BYTES * rows
        if self.stored > self._allowed:
            found = (
                f"{self.stored} bytes in {self.rows} rows for an upload of "
                f"{self.upload_bytes} bytes"
            )
            raise ReportError(self.limits.refusal("max_footprint_ratio", found))
