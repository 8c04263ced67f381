"""The streaming JUnit parser on the real corpus and on each dialect's statuses."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from ibutsu_worker.importing.errors import ReportError
from ibutsu_worker.importing.junit import MAX_TEXT, JUnitParser, parse_time, parse_timestamp
from ibutsu_worker.importing.records import ParsedResult
from ibutsu_worker_tests.corpus import REFUSED, corpus_files, expected_count


def parse(data: bytes, chunk: int = 7, **kwargs: int) -> list[ParsedResult]:
    # Small chunks prove that records and text spanning chunk boundaries survive.
    pieces = (data[i : i + chunk] for i in range(0, len(data), chunk))
    return list(JUnitParser(**kwargs).parse(pieces))


@pytest.mark.parametrize("path", [p for p in corpus_files() if p.name not in REFUSED], ids=str)
def test_corpus_counts(path: Path) -> None:
    results = parse(path.read_bytes(), chunk=65536)
    assert len(results) == expected_count(path)
    assert all(r.test_id for r in results)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_hostile_and_foreign_files_are_refused(name: str) -> None:
    path = next(p for p in corpus_files() if p.name == name)
    with pytest.raises(ReportError) as caught:
        parse(path.read_bytes(), chunk=65536)
    message = str(caught.value)
    if name == "testXxe-xxe.xml":
        assert "DTD" in message
    else:
        assert "not a JUnit report or Ibutsu archive" in message


PYTEST_XUNIT = b"""<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" timestamp="2026-01-02T03:04:05.123456+00:00">
<testcase classname="t" name="ok" time="0.5"/>
<testcase classname="t" name="bad" time="0.1"><failure message="assert 1 == 2">tb</failure></testcase>
<testcase classname="t" name="boom"><error message="setup failed">E</error></testcase>
<testcase classname="t" name="skip"><skipped type="pytest.skip" message="later">x</skipped></testcase>
<testcase classname="t" name="xf"><skipped type="pytest.xfail" message="bug 1"/></testcase>
<testcase classname="t" name="xp"><skipped message="xfail-marked test passes unexpectedly"/></testcase>
<testcase classname="t" name="xps"><failure message="[XPASS(strict)] bug 2"/></testcase>
<testcase classname="t" name="outerr"><system-out>hello</system-out><system-err>warn</system-err></testcase>
</testsuite></testsuites>"""


def test_pytest_statuses_and_metadata() -> None:
    results = {r.test_id: r for r in parse(PYTEST_XUNIT)}
    outcomes = {name: r.result for name, r in results.items()}
    assert outcomes == {
        "ok": "passed",
        "bad": "failed",
        "boom": "error",
        "skip": "skipped",
        "xf": "xfailed",
        "xp": "xpassed",
        "xps": "xpassed",
        "outerr": "passed",
    }
    assert results["bad"].metadata["message"] == "assert 1 == 2"
    assert results["bad"].metadata["short_tb"] == "tb"
    assert results["skip"].metadata["skip_reason"] == "later"
    assert results["outerr"].metadata["system_out"] == "hello"
    assert results["outerr"].metadata["system_err"] == "warn"
    assert results["ok"].duration == 0.5
    assert results["ok"].start_time is not None and results["ok"].start_time.year == 2026


NODE_REPORTER = b"""<?xml version="1.0" encoding="utf-8"?>
<testsuites>
  <testsuite name="math" tests="2" failures="1" skipped="0" hostname="ci" time="0.003">
    <testsuite name="nested" time="0.001">
      <testcase name="adds" time="0.0005" classname="test" file="/src/math.test.js"/>
    </testsuite>
    <testcase name="divides" time="0.001" classname="test">
      <failure type="testCodeFailure" message="Expected values to be strictly equal">
AssertionError [ERR_ASSERTION]</failure>
    </testcase>
  </testsuite>
  <testcase name="top level" time="0.0001" classname="test"/>
</testsuites>"""


def test_node_reporter_nesting_and_top_level_cases() -> None:
    results = parse(NODE_REPORTER)
    assert [(r.test_id, r.result) for r in results] == [
        ("adds", "passed"),
        ("divides", "failed"),
        ("top level", "passed"),
    ]
    assert results[0].metadata["suite"] == "nested"
    assert results[0].metadata["file"] == "/src/math.test.js"


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ("1.5", 1.5),
        ("1,234.5", 1234.5),
        ("", None),
        ("abc", None),
        ("-345345", None),
        ("nan", None),
    ],
)
def test_parse_time(raw: str, seconds: float | None) -> None:
    assert parse_time(raw) == seconds


@pytest.mark.parametrize(
    "raw",
    ["2024-01-03T 12:40:13", "2024-01-03 12:27:54Z", "2024-01-03", "2024-01-03T12:27:11.21-01:00"],
)
def test_parse_timestamp_formats(raw: str) -> None:
    parsed = parse_timestamp(raw)
    assert parsed is not None and parsed.tzinfo is not None


def test_timestamps_are_converted_to_utc() -> None:
    parsed = parse_timestamp("2024-01-03T12:27:11-01:00")
    assert parsed is not None
    assert (parsed.hour, parsed.utcoffset()) == (13, timedelta(0))


def test_unknown_timestamp_does_not_fail() -> None:
    assert parse_timestamp("yesterday") is None


def test_entity_expansion_is_refused() -> None:
    bomb = b"""<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">
<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>
<testsuite name="x"><testcase name="&lol2;"/></testsuite>"""
    with pytest.raises(ReportError, match="DTD"):
        parse(bomb)


def test_long_text_is_cut_and_marked() -> None:
    body = b"x" * (MAX_TEXT + 10)
    report = (
        b'<testsuite name="s"><testcase name="t"><system-out>'
        + body
        + b"</system-out></testcase></testsuite>"
    )
    (result,) = parse(report, chunk=4096)
    assert result.metadata["system_out"].endswith("[truncated]")
    assert len(result.metadata["system_out"]) <= MAX_TEXT + len("\n[truncated]")


def test_result_limit_names_the_setting() -> None:
    report = b'<testsuite name="s">' + b'<testcase name="t"/>' * 5 + b"</testsuite>"
    with pytest.raises(ReportError, match="IBUTSU_IMPORT_MAX_RESULTS"):
        parse(report, max_results=4)


def test_truncated_xml_is_a_clear_error() -> None:
    with pytest.raises(ReportError, match="malformed XML"):
        parse(b'<testsuite name="s"><testcase name="t">')


def test_parser_yields_before_the_end_of_the_document() -> None:
    parser = JUnitParser()
    head = b'<testsuite name="s">' + b'<testcase name="t"/>' * 3

    def chunks() -> Iterator[bytes]:
        yield head
        raise AssertionError("the parser read past what it needed")

    stream = parser.parse(chunks())
    assert next(stream).test_id == "t"
    assert Counter(r.result for r in [next(stream), next(stream)]) == {"passed": 2}
