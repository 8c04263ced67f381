"""pytest-ibutsu archives (.tar.gz)."""

from __future__ import annotations

from collections.abc import Iterator

from ibutsu_worker.importing.context import ImportContext, Landed
from ibutsu_worker.importing.errors import ReportError


def import_archive(context: ImportContext, chunks: Iterator[bytes]) -> Landed:
    """Import a pytest-ibutsu archive."""
    raise ReportError("Ibutsu archives are not supported by this worker version")
