"""A streaming JUnit/xUnit XML reader on top of expat.

It never builds a tree: records are yielded as their ``</testcase>`` closes, so memory stays
flat however large the report, and the work per element is constant, so time stays linear
however deep the suites nest. DTDs, entity declarations and external entities are refused
before anything could be expanded or fetched.

What it yields follows upstream's importer where the API and frontend read it back: the
``test_id`` is the last dot-part of ``classname``, a dot, and the last dot-part of ``name``;
the run's duration is the report's own total: the root's ``time``, else the sum of its top
suites' ``time`` (pytest's suite time includes fixtures and collection), else (the landing's
part) the sum of its cases';
result metadata holds ``fspath``, ``line`` and the suite and case ``<property>`` values (read
from ``name=``, the JUnit attribute, and from ``key=``, which upstream reads); a failure's or
error's text, and ``<system-out>``/``<system-err>``, become artifacts. Unlike upstream, xfail
and xpass stay what they are, and testcases nested at any depth are read.

Nothing is copied into every result uncut: a suite's properties go into its results only
while they add up to COPIED_PROPERTIES_BYTES (pytest's ``record_testsuite_property``); a
bigger set (Surefire's and Eclipse's Java system properties, kilobytes a suite) is stored
once, in the run's metadata. A suite's file is cut at MAX_PATH, property names at MAX_NAME.
Texts over TEXT_IN_MEMORY characters wait in a temporary file, not in memory.
"""

from __future__ import annotations

import itertools
import re
import tempfile
import xml.parsers.expat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any, NoReturn

from ibutsu_server.db.models import ResultOutcome, utcnow
from ibutsu_server.settings import ImportLimits
from ibutsu_worker.importing.errors import ReportError, quoted
from ibutsu_worker.importing.records import (
    ArtifactRecord,
    FileContent,
    Record,
    ResultRecord,
    RunRecord,
    RunUpdate,
)
from ibutsu_worker.importing.values import (
    DURATION_RANGE,
    TIMESTAMP_RANGE,
    parse_duration,
    parse_timestamp,
    sane_timestamp,
)

ROOTS = ("testsuites", "testsuite")
NOT_A_REPORT = "not a JUnit report or Ibutsu archive"
# Longest attribute text kept in metadata (a message, a skip reason); the rest is cut.
MAX_ATTRIBUTE_TEXT = 4096
MAX_PROPERTIES = 1000
# A property's name, and a suite's file (copied into each of its results), are cut here.
MAX_NAME = 255
MAX_PATH = 1024
# A suite's properties are copied into its results while they add up to this many characters.
COPIED_PROPERTIES_BYTES = 1024
MAX_DEPTH = 128
# Expat 2.5 (this interpreter's) scans one token in time quadratic in its size, however it is
# fed: a token (a comment, a tag with its attributes) may be this big, which real reports never
# come near, and costs a fraction of a second at most.
MAX_TOKEN_BYTES = 8 * 1024 * 1024
_TOO_BIG = (
    f"refused: more than {MAX_TOKEN_BYTES} bytes without an element or text "
    "(a comment, tag or attribute that large)"
)
# Expat builds a tag's attributes whole before anyone sees them (about 110 bytes of memory
# each): a tag still open after a slice may hold at most this many more '=' signs.
MAX_ATTRIBUTES = 100_000
_TOO_MANY_ATTRIBUTES = (
    f"refused: more than {MAX_ATTRIBUTES} '=' in one tag or comment (a tag with that many "
    "attributes)"
)
# A text (a failure's, a case's output) is held in memory up to this many characters, then
# written to a temporary file.
TEXT_IN_MEMORY = 1024 * 1024
XPASS_MESSAGES = ("xfail-marked test passes unexpectedly",)
_XPASS_STRICT = re.compile(r"^\[XPASS\(strict\)\]")
_TEXT_ARTIFACTS = {"failure": "traceback.log", "error": "traceback.log"}
_STREAM_ARTIFACTS = {"system-out": "system-out.log", "system-err": "system-err.log"}


def junit_test_id(classname: str, name: str) -> str:
    """A JUnit case's ``test_id`` as upstream builds it, so history and compare views match
    runs imported before: ``<last part of classname>.<last part of name>``."""
    short = name.split(".")[-1] if name else ""
    if classname:
        return f"{classname.split('.')[-1]}.{short}"
    return short or "(unnamed test)"


def _fspath(suite_file: str | None, case: dict[str, str]) -> str | None:
    """Upstream's ``fspath``: the suite's file, the case's, or the classname's module path."""
    if suite_file or case.get("file"):
        return _cut(suite_file or case.get("file") or "", MAX_PATH)
    classname = case.get("classname")
    return _cut("/".join(classname.split(".")[:-1]), MAX_PATH) if classname else None


def _cut(text: str, limit: int = MAX_ATTRIBUTE_TEXT) -> str:
    return text if len(text) <= limit else text[:limit] + " [cut]"


@dataclass
class _Suite:
    name: str
    file: str | None
    timestamp: Any
    # Its own and its ancestors' properties, for the cases inside it, while they are small.
    properties: dict[str, str]
    # Characters in ``properties``; None once they went to the run instead.
    copied: int | None = 0
    # Cases inside it at any depth: its own, plus each child suite's when that one closes.
    cases: int = 0
    error: dict[str, Any] | None = None


@dataclass
class _Case:
    attrs: dict[str, str]
    suite: _Suite | None
    outcome: str = ResultOutcome.PASSED
    metadata: dict[str, Any] = field(default_factory=dict)
    properties: dict[str, str] = field(default_factory=dict)
    artifacts: list[ArtifactRecord] = field(default_factory=list)


class _Text:
    """Character data of one element, cut at ``limit`` characters and stripped of surrounding
    whitespace (as ``str.strip``); held in memory up to TEXT_IN_MEMORY characters, then in a
    temporary file, so a text as big as the limits allow costs no memory."""

    def __init__(self, element: str, limit: int) -> None:
        self.element = element
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0  # characters seen, leading whitespace included (what the limit counts)
        self.held = 0  # characters in ``parts``
        self.truncated = False
        self.spaces = 0  # UTF-8 bytes of whitespace at the end of what is kept so far
        self.file: IO[bytes] | None = None

    def add(self, data: str) -> None:
        room = self.limit - self.size
        if len(data) > room:
            data, self.truncated = data[: max(room, 0)], True
        self.size += len(data)
        if not self.parts and self.file is None:
            data = data.lstrip()
        if not data:
            return
        body = data.rstrip()
        tail = len(data) - len(body)
        tail_bytes = len(data[len(body) :].encode()) if tail else 0
        self.spaces = tail_bytes if body else self.spaces + tail_bytes
        if self.file is not None:
            self.file.write(data.encode())
            return
        self.parts.append(data)
        self.held += len(data)
        if self.held > TEXT_IN_MEMORY:
            self.file = tempfile.TemporaryFile()
            self.file.write("".join(self.parts).encode())
            self.parts = []

    def text(self) -> str:
        """The text, for short ones kept in metadata (their limit keeps them in memory)."""
        value = self.content()
        assert isinstance(value, bytes)
        return value.decode()

    def content(self) -> bytes | FileContent:
        """The text as UTF-8: bytes, or the temporary file it waits in; empty when blank."""
        marker = b"\n[truncated]" if self.truncated else b""
        if self.file is None:
            encoded = "".join(self.parts).encode()
            return encoded[: len(encoded) - self.spaces] + marker
        size = self.file.tell() - self.spaces
        self.file.truncate(size)
        self.file.seek(size)
        self.file.write(marker)
        self.file.seek(0)
        return FileContent(self.file, size + len(marker))


class JUnitReader:
    """Push-parses a JUnit report chunk by chunk; :meth:`records` yields one RunRecord (before
    the first result), then every ResultRecord as its case closes, in document order."""

    def __init__(self, limits: ImportLimits) -> None:
        self.limits = limits
        # A failure's text or a case's output becomes an artifact: as big as one may be.
        self.max_text = limits.max_artifact_bytes
        self.count = 0
        self._events = 0  # handler calls so far: the parser's progress
        self._last_event_at = 0  # where in the document the last one began
        self._run: RunRecord | None = None
        self._root: dict[str, str] = {}
        self._root_start: datetime | None = None
        self._root_duration: float | None = None
        # The sum of the top suites' times (the root's children), None while none states one.
        self._suites_duration: float | None = None
        self._root_properties: dict[str, str] = {}
        # Properties for the run found after it was opened (a later suite's, stored once).
        self._late_properties: dict[str, str] = {}
        self._now = utcnow()
        # Attribute -> [how many values could not be used, the first, why, what instead].
        self._unusable: dict[str, list[Any]] = {}
        self._suites_seen = 0
        self._depth = 0
        self._parents: list[str] = []
        self._suites: list[_Suite] = []
        self._case: _Case | None = None
        self._text: _Text | None = None
        self._ready: list[Record] = []
        self._parser = xml.parsers.expat.ParserCreate()
        p = self._parser
        p.SetParamEntityParsing(xml.parsers.expat.XML_PARAM_ENTITY_PARSING_NEVER)
        p.StartDoctypeDeclHandler = self._refuse_dtd
        p.EntityDeclHandler = self._refuse_dtd
        p.ExternalEntityRefHandler = self._refuse_dtd
        p.StartElementHandler = self._start
        p.EndElementHandler = self._end
        p.CharacterDataHandler = self._chars
        p.buffer_text = True

    def records(self, chunks: Iterable[bytes]) -> Iterator[Record]:
        """Feed ``chunks`` of the report and yield its records."""
        try:
            for data in self._fed(chunks):
                self._parser.Parse(data, False)
                yield from self._drain()
            self._parser.Parse(b"", True)
        except xml.parsers.expat.ExpatError as exc:
            if not self._parents and self.count == 0 and not self._suites_seen:
                raise ReportError(f"{NOT_A_REPORT}: {exc}") from None
            raise ReportError(f"malformed XML: {exc}") from None
        if not self._suites_seen:
            raise ReportError(f"{NOT_A_REPORT}: no <testsuite> element")
        self._open_run()
        yield from self._drain()
        duration = None if self._root_duration else self._suites_duration
        if self._late_properties or self._unusable or duration is not None:
            yield RunUpdate(
                metadata=self._late_properties, warnings=self.warnings(), duration=duration
            )

    def warnings(self) -> list[str]:
        """What the report holds that could not be used, one line per attribute."""
        return [
            f"{count} {attribute}= value(s) {why} (the first: {quoted(first)}): {instead}"
            for attribute, (count, first, why, instead) in self._unusable.items()
        ]

    def _fed(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """The chunks, joined while the parser is inside one token.

        Expat before 2.6 scans a token it has not finished again from its start each time more
        data comes (CVE-2023-52425). While a slice brings no event, slices are held back until
        they add up to as much as was fed since the last event, so each rescan doubles the
        data; and no stretch without an event may exceed MAX_TOKEN_BYTES. Expat builds a tag's
        attributes only once the tag ends: the '=' signs of an unfinished token, and of what
        is fed to it while it stays unfinished, may not pass MAX_ATTRIBUTES."""
        pending: list[bytes] = []
        pending_size = stalled = fed = unfinished = 0
        for chunk in itertools.chain(chunks, [b""]):  # b"": what is held back goes at the end
            pending.append(chunk)
            pending_size += len(chunk)
            if chunk and pending_size < stalled:
                continue
            if stalled >= MAX_TOKEN_BYTES:
                raise ReportError(_TOO_BIG)
            data = b"".join(pending)
            if stalled and unfinished + data.count(b"=") > MAX_ATTRIBUTES:
                raise ReportError(_TOO_MANY_ATTRIBUTES)
            events = self._events
            yield data
            if self._events == events:
                stalled += pending_size
                unfinished += data.count(b"=")
            else:
                stalled = 0
                unfinished = data.count(b"=", max(self._last_event_at - fed, 0))
            if unfinished > MAX_ATTRIBUTES:
                raise ReportError(_TOO_MANY_ATTRIBUTES)
            fed += pending_size
            pending.clear()
            pending_size = 0

    def _drain(self) -> Iterator[Record]:
        ready, self._ready = self._ready, []
        yield from ready

    def _refuse_dtd(self, *_args: Any) -> NoReturn:
        raise ReportError(
            "refused: the XML declares a DTD or entities (<!DOCTYPE>/<!ENTITY>); "
            "JUnit reports never need them and they allow entity-expansion and XXE attacks"
        )

    def _open_run(self) -> None:
        """Emit the run once, before its first result: by then the root's properties and the
        first suite's timestamp have been read."""
        if self._run is not None:
            return
        start = self._root_start
        if start is None and self._suites:
            start = self._suites[0].timestamp
        self._run = RunRecord(
            start_time=start, duration=self._root_duration, metadata=dict(self._root_properties)
        )
        self._ready.append(self._run)

    def _emit(self, result: ResultRecord) -> None:
        self.count += 1
        if self.count > self.limits.max_results:
            raise ReportError(self.limits.refusal("max_results"))
        self._open_run()
        self._ready.append(result)

    def _progress(self) -> None:
        """Count an event; refuse a stretch longer than MAX_TOKEN_BYTES since the last one."""
        self._events += 1
        at = self._parser.CurrentByteIndex
        if at - self._last_event_at > MAX_TOKEN_BYTES:
            raise ReportError(_TOO_BIG)
        self._last_event_at = at

    def _start(self, name: str, attrs: dict[str, str]) -> None:
        self._progress()
        parent = self._parents[-1] if self._parents else None
        self._parents.append(name)
        if len(self._parents) > MAX_DEPTH:
            raise ReportError(f"refused: elements nest deeper than {MAX_DEPTH} levels")
        if parent is None:
            if name not in ROOTS:
                raise ReportError(
                    f"{NOT_A_REPORT}: the root element is <{name}>, "
                    "expected <testsuites> or <testsuite>"
                )
            self._root = attrs
            self._root_start = self._timestamp(attrs.get("timestamp"))
            self._root_duration = self._duration(attrs.get("time"))
        if name == "testsuite":
            self._suites_seen += 1
            if len(self._parents) == 2:  # a top suite: the root's child
                seconds = self._duration(attrs.get("time"))
                if seconds is not None:
                    self._suites_duration = (self._suites_duration or 0.0) + seconds
            outer = self._suites[-1] if self._suites else None
            own_file = attrs.get("file")
            self._suites.append(
                _Suite(
                    name=attrs.get("name", ""),
                    file=_cut(own_file, MAX_PATH) if own_file else (outer.file if outer else None),
                    timestamp=(
                        self._timestamp(attrs.get("timestamp")) if parent else self._root_start
                    )
                    or (outer.timestamp if outer else None),
                    properties=dict(outer.properties) if outer else {},
                    copied=outer.copied or 0 if outer else 0,
                )
            )
        elif name == "testcase":
            suite = self._suites[-1] if self._suites else None
            if suite is not None:
                suite.cases += 1
            self._case = _Case(attrs=attrs, suite=suite)
        elif name == "property" and parent == "properties":
            self._property(attrs)
        elif self._case is not None and parent == "testcase":
            self._case_child(name, attrs)
        elif parent == "testsuite" and name in ("error", "failure") and self._suites:
            self._suites[-1].error = {"kind": name, **_message(attrs)}
            self._text = _Text(name, self.max_text)

    def _property(self, attrs: dict[str, str]) -> None:
        key = attrs.get("name") or attrs.get("key")
        if not key:
            return
        key, value = _cut(key, MAX_NAME), _cut(attrs.get("value", ""))
        if self._case is not None:
            _put(self._case.properties, key, value)
        elif self._suites:
            if len(self._parents) == 3 and len(self._suites) == 1:
                # A <testsuite> root's own properties describe the run, as upstream reads them.
                self._run_property(key, value)
            self._suite_property(self._suites[-1], key, value)
        else:
            _put(self._root_properties, key, value)

    def _suite_property(self, suite: _Suite, key: str, value: str) -> None:
        """Copied into the suite's results while its properties are small; once they are
        not, all of them are stored once, on the run, instead."""
        if suite.copied is None:
            self._run_property(key, value)
            return
        _put(suite.properties, key, value)
        suite.copied += len(key) + len(value)
        if suite.copied > COPIED_PROPERTIES_BYTES:
            for name, text in suite.properties.items():
                self._run_property(name, text)
            suite.properties, suite.copied = {}, None

    def _run_property(self, key: str, value: str) -> None:
        """A property of the run's: the first value of each name stays."""
        if key in self._root_properties or key in self._late_properties:
            return
        late = self._run is not None
        if len(self._root_properties) + len(self._late_properties) >= MAX_PROPERTIES:
            raise ReportError(_too_many_properties("for the run"))
        (self._late_properties if late else self._root_properties)[key] = value

    def _case_child(self, name: str, attrs: dict[str, str]) -> None:
        case = self._case
        assert case is not None
        message = _cut(attrs.get("message", ""))
        if name in ("failure", "error"):
            if name == "failure" and _XPASS_STRICT.match(message):
                case.outcome = ResultOutcome.XPASSED
            elif case.outcome not in (ResultOutcome.FAILED, ResultOutcome.ERROR):
                case.outcome = ResultOutcome.FAILED if name == "failure" else ResultOutcome.ERROR
            if message:
                case.metadata.setdefault("short_tb", message)
            if attrs.get("type"):
                case.metadata.setdefault("exception_name", _cut(attrs["type"]))
            self._text = _Text(name, self.max_text)
        elif name == "skipped":
            if attrs.get("type") == "pytest.xfail":
                case.outcome = ResultOutcome.XFAILED
                if message:
                    case.metadata["xfail_reason"] = message
            elif message in XPASS_MESSAGES:
                case.outcome = ResultOutcome.XPASSED
            else:
                case.outcome = ResultOutcome.SKIPPED
                if message:
                    case.metadata["skip_reason"] = message
            self._text = _Text(name, MAX_ATTRIBUTE_TEXT)
        elif name in _STREAM_ARTIFACTS:
            self._text = _Text(name, self.max_text)

    def _chars(self, data: str) -> None:
        self._progress()
        if self._text is not None:
            self._text.add(data)

    def _end(self, name: str) -> None:
        self._progress()
        self._parents.pop()
        if self._text is not None and name == self._text.element:
            self._store_text(self._text)
            self._text = None
        if name == "testcase" and self._case is not None:
            self._emit(self._case_result(self._case))
            self._case = None
        elif name == "testsuite":
            suite = self._suites.pop()
            if self._suites:
                self._suites[-1].cases += suite.cases
            if suite.error is not None and suite.cases == 0:
                self._emit(self._suite_error_result(suite))

    def _store_text(self, text: _Text) -> None:
        value = text.content()
        if not (value if isinstance(value, bytes) else value.size):
            return
        case = self._case
        if case is None:
            if self._suites and self._suites[-1].error is not None:
                self._suites[-1].error["text"] = value
            return
        if text.element == "skipped":
            # Upstream's skip_reason is the element's text (pytest: "file:line: reason").
            if case.outcome == ResultOutcome.SKIPPED:
                case.metadata["skip_reason"] = text.text()
            return
        filename = _TEXT_ARTIFACTS.get(text.element) or _STREAM_ARTIFACTS[text.element]
        if not any(artifact.filename == filename for artifact in case.artifacts):
            case.artifacts.append(ArtifactRecord(filename=filename, content=value))

    def _timestamp(self, raw: str | None) -> datetime | None:
        """A ``timestamp`` attribute's time; None (and a warning) when unusable."""
        if not raw:
            return None
        parsed = parse_timestamp(raw)
        if parsed is not None and sane_timestamp(parsed, self._now):
            return parsed
        self._unusable_value(
            "timestamp", raw, f"not dates {TIMESTAMP_RANGE}", "the enclosing or upload time is used"
        )
        return None

    def _duration(self, raw: str | None) -> float | None:
        """A ``time`` attribute's seconds; None (and a warning) when unusable."""
        if not raw:
            return None
        seconds = parse_duration(raw)
        if seconds is None:
            self._unusable_value("time", raw, f"not {DURATION_RANGE}", "stored without one")
        return seconds

    def _unusable_value(self, attribute: str, raw: str, why: str, instead: str) -> None:
        self._unusable.setdefault(attribute, [0, raw, why, instead])[0] += 1

    def _case_result(self, case: _Case) -> ResultRecord:
        attrs = case.attrs
        suite = case.suite
        metadata: dict[str, Any] = {
            "fspath": _fspath(suite.file if suite else None, attrs),
            "line": attrs.get("line"),
        }
        if suite is not None:
            metadata.update(suite.properties)
        metadata.update(case.properties)
        metadata.update(case.metadata)
        return ResultRecord(
            test_id=junit_test_id(attrs.get("classname", ""), attrs.get("name", "")),
            result=case.outcome,
            start_time=self._timestamp(attrs.get("timestamp"))
            or (suite.timestamp if suite else None),
            duration=self._duration(attrs.get("time")),
            metadata=metadata,
            source=suite.name or None if suite else None,
            artifacts=case.artifacts,
        )

    def _suite_error_result(self, suite: _Suite) -> ResultRecord:
        error = dict(suite.error or {})
        text = error.pop("text", None)
        metadata: dict[str, Any] = {"fspath": suite.file, "line": None, **suite.properties}
        if error.get("message"):
            metadata["short_tb"] = error["message"]
        if error.get("type"):
            metadata["exception_name"] = error["type"]
        metadata["suite_level"] = error.get("kind", "error")
        return ResultRecord(
            test_id=suite.name or "(unnamed suite)",
            result=ResultOutcome.ERROR,
            start_time=suite.timestamp,
            metadata=metadata,
            source=suite.name or None,
            artifacts=[ArtifactRecord("traceback.log", text)] if text is not None else [],
        )


def _message(attrs: dict[str, str]) -> dict[str, str]:
    return {key: _cut(attrs[key]) for key in ("message", "type") if attrs.get(key)}


def _too_many_properties(where: str) -> str:
    return f"refused: more than {MAX_PROPERTIES} <property> elements {where}"


def _put(target: dict[str, str], key: str, value: str) -> None:
    """Set a property, refusing more than MAX_PROPERTIES in one place."""
    if key not in target and len(target) >= MAX_PROPERTIES:
        raise ReportError(_too_many_properties("in one place"))
    target[key] = value
