"""A streaming JUnit/xUnit XML parser on top of expat.

It never builds a tree: records are yielded as their ``</testcase>`` closes, so memory stays
flat however large the report. DTDs, entity declarations and external entities are refused
before anything could be expanded or fetched.
"""

from __future__ import annotations

import math
import re
import xml.parsers.expat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn

from ibutsu_worker.importing.errors import ReportError
from ibutsu_worker.importing.records import ParsedResult

ROOTS = ("testsuites", "testsuite")
NOT_A_REPORT = "not a JUnit report or Ibutsu archive"
# Longest text kept from one <failure>, <system-out>... element; the rest is cut and marked.
MAX_TEXT = 64 * 1024
XPASS_MESSAGES = ("xfail-marked test passes unexpectedly",)
_XPASS_STRICT = re.compile(r"^\[XPASS\(strict\)\]")


def parse_time(value: str | None) -> float | None:
    """Seconds from a ``time`` attribute; None when missing, negative or malformed."""
    if not value:
        return None
    try:
        seconds = float(value.strip().replace(",", ""))
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def parse_timestamp(value: str | None) -> datetime | None:
    """A timezone-aware datetime from the timestamp formats real tools write; None if unknown."""
    if not value:
        return None
    text = re.sub(r"T\s+", "T", value.strip())
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    # In UTC: SQLite keeps no offset, so a local time would be stored as a wrong instant.
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass
class _Suite:
    name: str
    timestamp: datetime | None
    hostname: str | None
    cases: int = 0
    error: dict[str, Any] | None = None


@dataclass
class _Case:
    attrs: dict[str, str]
    suite: _Suite | None
    outcome: str = "passed"
    details: dict[str, Any] = field(default_factory=dict)
    properties: dict[str, str] = field(default_factory=dict)


class _Text:
    """Character data of one element, cut at MAX_TEXT."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.parts: list[str] = []
        self.size = 0
        self.truncated = False

    def add(self, data: str) -> None:
        room = MAX_TEXT - self.size
        if room <= 0:
            self.truncated = True
            return
        if len(data) > room:
            data, self.truncated = data[:room], True
        self.parts.append(data)
        self.size += len(data)

    def value(self) -> str:
        text = "".join(self.parts).strip()
        return f"{text}\n[truncated]" if self.truncated else text


class JUnitParser:
    """Push-parses a JUnit report chunk by chunk; :meth:`parse` yields results as they close."""

    def __init__(self, max_results: int | None = None) -> None:
        self.max_results = max_results
        self.count = 0
        self.suite_names: list[str] = []
        self.suite_properties: dict[str, str] = {}
        self._stack: list[str] = []
        self._suites: list[_Suite] = []
        self._case: _Case | None = None
        self._text: _Text | None = None
        self._ready: list[ParsedResult] = []
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

    def parse(self, chunks: Iterable[bytes]) -> Iterator[ParsedResult]:
        """Feed ``chunks`` of the report and yield every result in document order."""
        try:
            for chunk in chunks:
                self._parser.Parse(chunk, False)
                yield from self._drain()
            self._parser.Parse(b"", True)
        except xml.parsers.expat.ExpatError as exc:
            if not self._stack and self.count == 0 and not self.suite_names:
                raise ReportError(f"{NOT_A_REPORT}: {exc}") from None
            raise ReportError(f"malformed XML: {exc}") from None
        yield from self._drain()
        if not self.suite_names:
            raise ReportError(f"{NOT_A_REPORT}: no <testsuite> element")

    def _drain(self) -> Iterator[ParsedResult]:
        ready, self._ready = self._ready, []
        yield from ready

    def _refuse_dtd(self, *_args: Any) -> NoReturn:
        raise ReportError(
            "refused: the XML declares a DTD or entities (<!DOCTYPE>/<!ENTITY>); "
            "JUnit reports never need them and they allow entity-expansion and XXE attacks"
        )

    def _emit(self, result: ParsedResult) -> None:
        self.count += 1
        if self.max_results is not None and self.count > self.max_results:
            raise ReportError(
                f"too many results: the limit is {self.max_results} per import "
                "(IBUTSU_IMPORT_MAX_RESULTS)"
            )
        self._ready.append(result)

    def _start(self, name: str, attrs: dict[str, str]) -> None:
        parent = self._stack[-1] if self._stack else None
        self._stack.append(name)
        if parent is None and name not in ROOTS:
            raise ReportError(
                f"{NOT_A_REPORT}: the root element is <{name}>, "
                "expected <testsuites> or <testsuite>"
            )
        if name == "testsuite":
            suite = _Suite(
                name=attrs.get("name", ""),
                timestamp=parse_timestamp(attrs.get("timestamp")),
                hostname=attrs.get("hostname"),
            )
            self._suites.append(suite)
            self.suite_names.append(suite.name)
        elif name == "testcase":
            for suite in self._suites:
                suite.cases += 1
            self._case = _Case(attrs=attrs, suite=self._suites[-1] if self._suites else None)
        elif name == "property" and parent == "properties":
            self._property(attrs)
        elif self._case is not None and parent == "testcase":
            self._case_child(name, attrs)
        elif parent == "testsuite" and name in ("error", "failure") and self._suites:
            self._suites[-1].error = {"kind": name, **_message(attrs)}
            self._text = _Text("short_tb")

    def _property(self, attrs: dict[str, str]) -> None:
        key = attrs.get("name", "")
        value = attrs.get("value", "")
        if self._case is not None:
            self._case.properties[key] = value
        elif len(self.suite_properties) < 1000:
            self.suite_properties[key] = value

    def _case_child(self, name: str, attrs: dict[str, str]) -> None:
        case = self._case
        assert case is not None
        if name in ("failure", "error"):
            message = attrs.get("message", "")
            if name == "failure" and _XPASS_STRICT.match(message):
                case.outcome = "xpassed"
            elif case.outcome not in ("failed", "error"):
                case.outcome = "failed" if name == "failure" else "error"
            case.details.update(_message(attrs))
            self._text = _Text("short_tb")
        elif name == "skipped":
            message = attrs.get("message", "")
            if attrs.get("type") == "pytest.xfail":
                case.outcome = "xfailed"
            elif message in XPASS_MESSAGES:
                case.outcome = "xpassed"
            else:
                case.outcome = "skipped"
            if message:
                case.details["skip_reason"] = message
            self._text = _Text("skip_details")
        elif name in ("system-out", "system-err"):
            self._text = _Text(name.replace("-", "_"))
        elif name in ("rerunFailure", "flakyFailure", "rerunError", "flakyError"):
            case.details["reruns"] = case.details.get("reruns", 0) + 1

    def _chars(self, data: str) -> None:
        if self._text is not None:
            self._text.add(data)

    def _end(self, name: str) -> None:
        self._stack.pop()
        if self._text is not None and name in (
            "failure",
            "error",
            "skipped",
            "system-out",
            "system-err",
        ):
            self._store_text(self._text)
            self._text = None
        if name == "testcase" and self._case is not None:
            self._emit(_case_result(self._case))
            self._case = None
        elif name == "testsuite":
            suite = self._suites.pop()
            if suite.error is not None and suite.cases == 0:
                self._emit(_suite_error_result(suite))

    def _store_text(self, text: _Text) -> None:
        value = text.value()
        if not value:
            return
        if self._case is not None:
            self._case.details[text.key] = value
        elif self._suites and self._suites[-1].error is not None:
            self._suites[-1].error[text.key] = value


def _message(attrs: dict[str, str]) -> dict[str, str]:
    out = {}
    if attrs.get("message"):
        out["message"] = attrs["message"]
    if attrs.get("type"):
        out["type"] = attrs["type"]
    return out


def _case_result(case: _Case) -> ParsedResult:
    attrs = case.attrs
    suite = case.suite
    classname = attrs.get("classname", "")
    name = attrs.get("name", "")
    metadata: dict[str, Any] = {
        key: attrs[key] for key in ("classname", "file", "line") if attrs.get(key)
    }
    if suite is not None and suite.name:
        metadata["suite"] = suite.name
    if suite is not None and suite.hostname:
        metadata["hostname"] = suite.hostname
    if case.properties:
        metadata["properties"] = case.properties
    metadata.update(case.details)
    timestamp = parse_timestamp(attrs.get("timestamp"))
    return ParsedResult(
        test_id=name or classname or "(unnamed test)",
        result=case.outcome,
        start_time=timestamp or (suite.timestamp if suite else None),
        duration=parse_time(attrs.get("time")),
        metadata=metadata,
    )


def _suite_error_result(suite: _Suite) -> ParsedResult:
    error = dict(suite.error or {})
    kind = error.pop("kind", "error")
    return ParsedResult(
        test_id=suite.name or "(unnamed suite)",
        result="error",
        start_time=suite.timestamp,
        metadata={"suite": suite.name, "suite_level": kind, **error},
    )
