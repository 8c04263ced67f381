"""pytest-ibutsu archives (.tar.gz) read into records: ``<run-uuid>/run.json``,
``<run-uuid>/<result-uuid>/result.json``, and artifacts beside them (``<run-uuid>/<file>`` for
the run, ``<run-uuid>/<result-uuid>/<file>`` for a result).

Members come from ``tar_reader`` already checked for safety; here each is checked against the
layout and its JSON against what the database can store, and turned into a RunRecord,
ResultRecord or ArtifactRecord in archive order. The run and its results keep their archive
ids. Knows nothing of the database: the landing writes the records.
"""

from __future__ import annotations

import contextlib
import json
import math
import mimetypes
import re
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from ibutsu_server.db.models import ResultOutcome, utcnow
from ibutsu_server.settings import ImportLimits
from ibutsu_worker.importing.errors import ReportError, quoted
from ibutsu_worker.importing.records import (
    ArtifactRecord,
    FileContent,
    Record,
    ResultRecord,
    RunRecord,
)
from ibutsu_worker.importing.tar_reader import Member, members
from ibutsu_worker.importing.values import (
    DURATION_RANGE,
    TIMESTAMP_RANGE,
    parse_timestamp,
    sane_duration,
    sane_timestamp,
)

# run.json and result.json are small documents; anything bigger is refused before parsing.
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024
# Parsed, each JSON value costs 50 to 100 bytes of memory whatever its size ('{}' is 2): a
# document may hold this many (objects, arrays and their items), counted before parsing.
MAX_DOCUMENT_VALUES = 100_000
# Artifacts up to this size are read into memory; bigger ones are streamed to the spool.
ARTIFACT_IN_MEMORY = 1024 * 1024
# artifacts.filename is indexed: a name must fit a B-tree entry.
MAX_FILENAME = 255
LAYOUT = (
    "expected <run-uuid>/run.json, <run-uuid>/<result-uuid>/result.json and artifacts "
    "beside them"
)
_OUTCOMES = frozenset(outcome.value for outcome in ResultOutcome)


def archive_records(chunks: Iterator[bytes], limits: ImportLimits) -> Iterator[Record]:
    """The records of a pytest-ibutsu archive, in archive order; ReportError for anything that
    is not a safe, well-formed archive."""
    layout = _Layout(limits)
    for member in members(chunks, limits):
        record = layout.record(member)
        if record is not None:
            yield record
    layout.check_complete()


class _Layout:
    """Where each member sits in the archive's layout, checked as members stream past."""

    def __init__(self, limits: ImportLimits) -> None:
        self.limits = limits
        self.run_id: uuid.UUID | None = None
        self.has_run = False
        self.results: set[uuid.UUID] = set()
        self.owners: dict[uuid.UUID, str] = {}  # result folders holding artifacts -> a member
        self.now = utcnow()

    def record(self, member: Member) -> Record | None:
        """The member's record; None for folders."""
        if not member.parts:
            return None
        run_id = self._run_folder(member)
        if member.is_dir:
            return None
        if len(member.parts) < 2:
            raise ReportError(
                f"refused {quoted(member.name)}: a file outside the run folder ({LAYOUT})"
            )
        if member.parts[1:] == ("run.json",):
            if self.has_run:
                raise ReportError(f"{quoted(member.name)}: the archive holds run.json twice")
            self.has_run = True
            return _run(run_id, member.name, _document(member), self.now)
        if len(member.parts) == 2:
            return _artifact(member, member.parts[1], None, False)
        result_id = _uuid(member.parts[1])
        if result_id is None:
            raise ReportError(
                f"refused {quoted(member.name)}: {quoted(member.parts[1])} is not a result "
                "folder (named after the result's UUID)"
            )
        filename = "/".join(member.parts[2:])
        if filename != "result.json":
            self.owners.setdefault(result_id, member.name)
            return _artifact(member, filename, result_id, result_id not in self.results)
        self.results.add(result_id)
        if len(self.results) > self.limits.max_results:
            raise ReportError(self.limits.refusal("max_results"))
        return _result(run_id, result_id, member.name, _document(member), self.now)

    def _run_folder(self, member: Member) -> uuid.UUID:
        folder = _uuid(member.parts[0])
        if folder is None:
            raise ReportError(
                f"refused {quoted(member.name)}: the archive's top folder must be named after "
                "its run's UUID"
            )
        if self.run_id is None:
            self.run_id = folder
        elif folder != self.run_id:
            raise ReportError(
                f"refused {quoted(member.name)}: a second run folder; an Ibutsu archive holds "
                f"exactly one run ({self.run_id})"
            )
        return folder

    def check_complete(self) -> None:
        """ReportError unless the archive had its run.json and a result for every artifact."""
        if not self.has_run:
            raise ReportError(f"not an Ibutsu archive: there is no <run-uuid>/run.json ({LAYOUT})")
        for result_id, name in self.owners.items():
            if result_id not in self.results:
                raise ReportError(
                    f"{quoted(name)}: its folder has no result.json, so the artifact belongs "
                    "to no result"
                )


def _uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def _artifact(
    member: Member, filename: str, result_id: uuid.UUID | None, before_result: bool
) -> ArtifactRecord:
    if len(filename) > MAX_FILENAME:
        raise ReportError(
            f"refused {quoted(member.name)}: file names are at most {MAX_FILENAME} characters"
        )
    try:
        filename.encode()
    except UnicodeEncodeError:
        raise ReportError(f"refused {quoted(member.name)}: the name is not valid UTF-8") from None
    assert member.stream is not None  # a file: folders were skipped
    content_type = mimetypes.guess_type(filename)[0] or "text/plain"
    content: bytes | FileContent = (
        member.stream.read()
        if member.size <= ARTIFACT_IN_MEMORY
        else FileContent(member.stream, member.size)
    )
    return ArtifactRecord(filename, content, result_id, content_type, before_result)


def _document(member: Member) -> dict[str, Any]:
    """The member's JSON object, checked to be storable: no NaN or infinities, no NUL, no lone
    surrogate; refused unread when bigger than MAX_DOCUMENT_BYTES."""
    where = quoted(member.name)
    if member.size > MAX_DOCUMENT_BYTES:
        raise ReportError(
            f"{where} is {member.size} bytes; an Ibutsu archive's JSON documents are at most "
            f"{MAX_DOCUMENT_BYTES} bytes"
        )
    assert member.stream is not None
    try:
        text = member.stream.read().decode("utf-8-sig")
        if (values := _values(text)) > MAX_DOCUMENT_VALUES:
            raise ReportError(
                f"{where} holds about {values} JSON values; an Ibutsu archive's JSON documents "
                f"hold at most {MAX_DOCUMENT_VALUES}"
            )
        doc = json.loads(text, parse_float=_finite, parse_constant=_finite)
    except RecursionError:
        raise ReportError(f"{where}: the JSON is nested too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError among them
        raise ReportError(f"{where}: not valid UTF-8 JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ReportError(f"{where}: expected a JSON object")
    # Only escapes can put these in; look closer only if an escape that could appears at all.
    lowered = text.lower()
    if ("\\u0000" in lowered or "\\ud" in lowered) and (problem := _unstorable(doc)):
        raise ReportError(f"{where}: contains {problem}, which cannot be stored")
    return doc


# A JSON string, or the rest of the text from an unterminated one (so the scan stays linear).
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*(?:"|$)', re.DOTALL)


def _values(text: str) -> int:
    """About how many values a JSON text holds: its objects, arrays and separators, outside
    strings (a string's content is never counted)."""
    if text.count(",") + text.count("{") + text.count("[") <= MAX_DOCUMENT_VALUES:
        return 0  # few enough even counting inside strings: no need to look closer
    bare = _JSON_STRING.sub('""', text)
    return bare.count(",") + bare.count("{") + bare.count("[")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


def _unstorable(value: Any) -> str | None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return "a NUL character (\\u0000)"
            try:
                item.encode()
            except UnicodeEncodeError:
                return "a lone surrogate (\\ud800-\\udfff)"
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _check_id(doc: dict[str, Any], key: str, expected: uuid.UUID, where: str) -> None:
    """An id in a document may be left out, but must otherwise name its own folder."""
    value = doc.get(key)
    if value in (None, ""):
        return
    if not isinstance(value, str) or _uuid(value) != expected:
        raise ReportError(f"{where}: {key} is {quoted(value)}, but its folder says {expected}")


def _mapping(doc: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ReportError(f"{where}: {key} must be a JSON object")
    return value


def _text(doc: dict[str, Any], key: str, where: str) -> str | None:
    value = doc.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ReportError(f"{where}: {key} must be a string, not {quoted(value)}")
    return value


def _timestamp(doc: dict[str, Any], key: str, where: str, now: datetime) -> datetime | None:
    value = doc.get(key)
    if value is None or value == "":
        return None
    parsed = parse_timestamp(value) if isinstance(value, str) else None
    if parsed is None:
        raise ReportError(f"{where}: {key} {quoted(value)} is not an ISO 8601 date")
    if not sane_timestamp(parsed, now):
        raise ReportError(f"{where}: {key} {quoted(value)} is not a date {TIMESTAMP_RANGE}")
    return parsed


def _seconds(doc: dict[str, Any], key: str, where: str) -> float | None:
    value = doc.get(key)
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError):
            seconds = float(value)
            if sane_duration(seconds):
                return seconds
    raise ReportError(f"{where}: {key} must be {DURATION_RANGE}, not {quoted(value)}")


def _run(run_id: uuid.UUID, name: str, doc: dict[str, Any], now: datetime) -> RunRecord:
    where = quoted(name)
    _check_id(doc, "id", run_id, where)
    metadata = _mapping(doc, "metadata", where)
    collected = _mapping(doc, "summary", where).get("collected")
    if collected is not None and (
        isinstance(collected, bool) or not isinstance(collected, int) or collected < 0
    ):
        raise ReportError(
            f"{where}: summary.collected must be a whole number, not {quoted(collected)}"
        )
    project = doc.get("project_id") or metadata.get("project")
    return RunRecord(
        id=run_id,
        start_time=_timestamp(doc, "start_time", where, now),
        duration=_seconds(doc, "duration", where),
        component=_text(metadata, "component", where) or _text(doc, "component", where),
        env=_text(metadata, "env", where) or _text(doc, "env", where),
        source=_text(doc, "source", where),
        metadata=metadata,
        collected=collected,
        project=str(project) if project else None,
    )


def _result(
    run_id: uuid.UUID, result_id: uuid.UUID, name: str, doc: dict[str, Any], now: datetime
) -> ResultRecord:
    where = quoted(name)
    _check_id(doc, "id", result_id, where)
    _check_id(doc, "run_id", run_id, where)
    outcome = doc.get("result")
    if not isinstance(outcome, str) or outcome not in _OUTCOMES:
        raise ReportError(
            f"{where}: result is {quoted(outcome)}, expected one of {', '.join(ResultOutcome)}"
        )
    test_id = doc.get("test_id")
    if not isinstance(test_id, str) or not test_id:
        raise ReportError(f"{where}: test_id is missing or not a string")
    metadata = dict(_mapping(doc, "metadata", where))
    # pytest-ibutsu's user properties are metadata of their own, as upstream promotes them.
    user_properties = metadata.pop("user_properties", None)
    if isinstance(user_properties, dict):
        metadata.update(user_properties)
    return ResultRecord(
        id=result_id,
        test_id=test_id,
        result=outcome,
        start_time=_timestamp(doc, "start_time", where, now),
        duration=_seconds(doc, "duration", where),
        params=_mapping(doc, "params", where),
        metadata=metadata,
        source=_text(doc, "source", where),
        component=_text(doc, "component", where) or _text(metadata, "component", where),
        env=_text(doc, "env", where) or _text(metadata, "env", where),
    )
