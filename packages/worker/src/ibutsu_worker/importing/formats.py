"""The formats an upload can be in, told from its first bytes, never from its file name."""

from __future__ import annotations

import enum

GZIP_MAGIC = b"\x1f\x8b"
_UTF8_BOM = b"\xef\xbb\xbf"


class ImportFormat(enum.StrEnum):
    """An import's ``format`` as the API stores it; ``UNKNOWN`` until its content is read."""

    JUNIT = "junit"
    ARCHIVE = "archive"
    UNKNOWN = "unknown"

    @classmethod
    def detect(cls, head: bytes) -> ImportFormat:
        """The format of content starting with ``head``: a gzip stream is a pytest-ibutsu
        archive, XML is JUnit, anything else is ``UNKNOWN``."""
        if head.startswith(GZIP_MAGIC):
            return cls.ARCHIVE
        if head.removeprefix(_UTF8_BOM).lstrip().startswith(b"<"):
            return cls.JUNIT
        return cls.UNKNOWN
