"""Formats are told from the content's first bytes, never from a file name."""

from __future__ import annotations

import gzip

import pytest

from ibutsu_server import task_names
from ibutsu_worker.importing.formats import ImportFormat
from ibutsu_worker.submission import import_task_name


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (gzip.compress(b"anything"), ImportFormat.ARCHIVE),
        (b'<?xml version="1.0"?><testsuites/>', ImportFormat.JUNIT),
        (b"\xef\xbb\xbf  \n<testsuite/>", ImportFormat.JUNIT),  # a BOM, then white space
        (b"PK\x03\x04", ImportFormat.UNKNOWN),  # a zip file is not an archive of ours
        (b"", ImportFormat.UNKNOWN),
    ],
)
def test_the_format_comes_from_the_first_bytes(head: bytes, expected: ImportFormat) -> None:
    assert ImportFormat.detect(head) is expected


def test_the_task_sent_follows_the_format() -> None:
    assert import_task_name(gzip.compress(b"x")) == task_names.RUN_ARCHIVE_IMPORT
    assert import_task_name(b"<testsuite/>") == task_names.RUN_JUNIT_IMPORT
