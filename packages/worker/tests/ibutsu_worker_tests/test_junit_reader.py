"""The streaming JUnit reader on the real corpus and on each dialect's statuses; no database."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from ibutsu_server.settings import ImportLimits
from ibutsu_worker.importing import junit
from ibutsu_worker.importing.errors import ReportError
from ibutsu_worker.importing.junit import (
    COPIED_PROPERTIES_BYTES,
    MAX_ATTRIBUTES,
    MAX_DEPTH,
    MAX_PATH,
    MAX_PROPERTIES,
    JUnitReader,
    junit_test_id,
)
from ibutsu_worker.importing.records import FileContent, Record, ResultRecord, RunRecord, RunUpdate
from ibutsu_worker.importing.values import parse_duration, parse_timestamp
from ibutsu_worker_tests.corpus import REFUSED, corpus_files, expected_count

MAX_TEXT = 1000


def read(data: bytes, chunk: int = 7, max_results: int = 10_000) -> list[Record]:
    # Small chunks prove that records and text spanning chunk boundaries survive.
    pieces = (data[i : i + chunk] for i in range(0, len(data), chunk))
    limits = ImportLimits(max_results=max_results, max_artifact_bytes=MAX_TEXT)
    return list(JUnitReader(limits).records(pieces))


def results(data: bytes, chunk: int = 7, **kwargs: int) -> list[ResultRecord]:
    return [r for r in read(data, chunk, **kwargs) if isinstance(r, ResultRecord)]


@pytest.mark.parametrize("path", [p for p in corpus_files() if p.name not in REFUSED], ids=str)
def test_corpus_counts(path: Path) -> None:
    records = read(path.read_bytes(), chunk=65536)
    assert isinstance(records[0], RunRecord)  # the run comes first, exactly once
    assert sum(isinstance(r, RunRecord) for r in records) == 1
    found = [r for r in records if isinstance(r, ResultRecord)]
    assert len(found) == expected_count(path)
    assert all(r.test_id for r in found)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_hostile_and_foreign_files_are_refused(name: str) -> None:
    path = next(p for p in corpus_files() if p.name == name)
    with pytest.raises(ReportError) as caught:
        read(path.read_bytes(), chunk=65536)
    message = str(caught.value)
    if name == "testXxe-xxe.xml":
        assert "DTD" in message
    else:
        assert "not a JUnit report or Ibutsu archive" in message


PYTEST_XUNIT = b"""<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" timestamp="2026-01-02T03:04:05.123456+01:00">
<properties><property name="suite_prop" value="s"/></properties>
<testcase classname="tests.test_t" name="ok" time="0.5" file="tests/test_t.py" line="3"/>
<testcase classname="t" name="bad" time="0.1"><failure message="assert 1 == 2" type="AssertionError">tb</failure></testcase>
<testcase classname="t" name="boom"><error message="setup failed">E</error></testcase>
<testcase classname="t" name="skip"><skipped type="pytest.skip" message="later">t.py:9: later</skipped></testcase>
<testcase classname="t" name="xf"><skipped type="pytest.xfail" message="bug 1"/></testcase>
<testcase classname="t" name="xp"><skipped message="xfail-marked test passes unexpectedly"/></testcase>
<testcase classname="t" name="xps"><failure message="[XPASS(strict)] bug 2"/></testcase>
<testcase classname="t" name="outerr"><properties><property key="owner" value="qa"/></properties>
<system-out>hello</system-out><system-err>warn</system-err></testcase>
</testsuite></testsuites>"""


def test_pytest_statuses_metadata_and_artifacts() -> None:
    found = {r.test_id: r for r in results(PYTEST_XUNIT)}
    assert {name: r.result for name, r in found.items()} == {
        "test_t.ok": "passed",
        "t.bad": "failed",
        "t.boom": "error",
        "t.skip": "skipped",
        "t.xf": "xfailed",
        "t.xp": "xpassed",
        "t.xps": "xpassed",
        "t.outerr": "passed",
    }
    ok, bad = found["test_t.ok"], found["t.bad"]
    # Upstream's layout: fspath and line, then the suite's and the case's properties.
    assert ok.metadata == {"fspath": "tests/test_t.py", "line": "3", "suite_prop": "s"}
    assert bad.metadata["fspath"] == "" and bad.metadata["line"] is None
    assert bad.metadata["short_tb"] == "assert 1 == 2"
    assert bad.metadata["exception_name"] == "AssertionError"
    assert [(a.filename, a.content) for a in bad.artifacts] == [("traceback.log", b"tb")]
    assert found["t.skip"].metadata["skip_reason"] == "t.py:9: later"
    assert found["t.xf"].metadata["xfail_reason"] == "bug 1"
    outerr = found["t.outerr"]
    assert outerr.metadata["owner"] == "qa"  # key= as upstream reads it, name= as JUnit writes
    assert {a.filename: a.content for a in outerr.artifacts} == {
        "system-out.log": b"hello",
        "system-err.log": b"warn",
    }
    assert ok.duration == 0.5 and ok.source == "pytest"
    assert ok.start_time == datetime(2026, 1, 2, 2, 4, 5, 123456)  # naive UTC


def test_run_comes_first_with_the_root_properties_and_start() -> None:
    report = b"""<testsuites timestamp="2026-03-04T05:06:07Z"><properties>
    <property name="build" value="7"/></properties>
    <testsuite name="a" timestamp="2026-03-04T06:00:00"><testcase name="t"/></testsuite></testsuites>"""
    run, result = read(report)
    assert isinstance(run, RunRecord) and isinstance(result, ResultRecord)
    assert run.metadata == {"build": "7"}
    assert run.start_time == datetime(2026, 3, 4, 5, 6, 7)
    assert result.start_time == datetime(2026, 3, 4, 6, 0, 0)


@pytest.mark.parametrize(
    ("classname", "name", "expected"),
    [
        ("tests.test_sample", "test_login_ok", "test_sample.test_login_ok"),
        ("test_sample", "test_pagination[1]", "test_sample.test_pagination[1]"),
        ("", "a.b.test_x", "test_x"),
        ("com.acme.FooTest", "", "FooTest."),
        ("", "", "(unnamed test)"),
    ],
)
def test_test_id_is_built_as_upstream_builds_it(classname: str, name: str, expected: str) -> None:
    assert junit_test_id(classname, name) == expected


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
    found = results(NODE_REPORTER)
    assert [(r.test_id, r.result, r.source) for r in found] == [
        ("test.adds", "passed", "nested"),
        ("test.divides", "failed", "math"),
        ("test.top level", "passed", None),
    ]
    assert found[0].metadata["fspath"] == "/src/math.test.js"


def test_suite_level_error_without_cases_is_one_error_result() -> None:
    report = b"""<testsuites><testsuite name="broken" file="t.py">
    <error message="collection failed" type="ImportError">Traceback</error></testsuite></testsuites>"""
    (found,) = results(report)
    assert (found.test_id, found.result, found.source) == ("broken", "error", "broken")
    assert found.metadata["short_tb"] == "collection failed"
    assert [a.content for a in found.artifacts] == [b"Traceback"]


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
def test_parse_duration(raw: str, seconds: float | None) -> None:
    assert parse_duration(raw) == seconds


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2024-01-03T 12:40:13", datetime(2024, 1, 3, 12, 40, 13)),
        ("2024-01-03 12:27:54Z", datetime(2024, 1, 3, 12, 27, 54)),
        ("2024-01-03", datetime(2024, 1, 3)),
        ("2024-01-03T12:27:11.5-01:00", datetime(2024, 1, 3, 13, 27, 11, 500000)),
        ("0001-01-01T00:00:00+01:00", None),  # out of range once in UTC
        ("yesterday", None),
    ],
)
def test_parse_timestamp_gives_naive_utc(raw: str, expected: datetime | None) -> None:
    assert parse_timestamp(raw) == expected


def test_entity_expansion_is_refused() -> None:
    bomb = b"""<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">
<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>
<testsuite name="x"><testcase name="&lol2;"/></testsuite>"""
    with pytest.raises(ReportError, match="DTD"):
        read(bomb)


def test_long_text_is_cut_and_marked() -> None:
    body = b"x" * (MAX_TEXT + 10)
    report = (
        b'<testsuite name="s"><testcase name="t"><system-out>'
        + body
        + b"</system-out></testcase></testsuite>"
    )
    (result,) = results(report, chunk=4096)
    (artifact,) = result.artifacts
    assert isinstance(artifact.content, bytes)
    assert artifact.content.endswith(b"[truncated]")
    assert len(artifact.content) <= MAX_TEXT + len("\n[truncated]")


def test_result_limit_names_the_setting() -> None:
    report = b'<testsuite name="s">' + b'<testcase name="t"/>' * 5 + b"</testsuite>"
    with pytest.raises(ReportError, match="IBUTSU_IMPORT_MAX_RESULTS"):
        read(report, max_results=4)


def test_truncated_xml_is_a_clear_error() -> None:
    with pytest.raises(ReportError, match="malformed XML"):
        read(b'<testsuite name="s"><testcase name="t">')


def test_nesting_depth_is_capped() -> None:
    report = b"<testsuites>" + b'<testsuite name="s">' * MAX_DEPTH + b"</testsuite>" * MAX_DEPTH
    with pytest.raises(ReportError, match=f"deeper than {MAX_DEPTH}"):
        read(report + b"</testsuites>", chunk=65536)


def test_properties_per_place_are_capped() -> None:
    props = b"".join(b'<property name="p%d" value="v"/>' % n for n in range(MAX_PROPERTIES + 1))
    report = b'<testsuite name="s"><testcase name="t"><properties>' + props
    with pytest.raises(ReportError, match=f"more than {MAX_PROPERTIES}"):
        read(report + b"</properties></testcase></testsuite>", chunk=65536)


def test_reader_yields_before_the_end_of_the_document() -> None:
    reader = JUnitReader(ImportLimits(max_results=100))
    head = b'<testsuite name="s">' + b'<testcase name="t"/>' * 3

    def chunks() -> Iterator[bytes]:
        yield head
        raise AssertionError("the reader read past what it needed")

    stream = reader.records(chunks())
    assert isinstance(next(stream), RunRecord)
    assert [next(stream).result for _ in range(3)] == ["passed"] * 3  # type: ignore[union-attr]


def test_a_text_too_big_for_memory_waits_in_a_file_stripped_as_in_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(junit, "TEXT_IN_MEMORY", 64)
    body = "  \n é" + "x" * 300 + " \u3000\n "  # leading and trailing whitespace, wide ones
    report = (
        '<testsuite name="s"><testcase name="t"><system-out>'
        + body
        + "</system-out></testcase></testsuite>"
    ).encode()
    (result,) = results(report, chunk=50)
    (artifact,) = result.artifacts
    assert isinstance(artifact.content, FileContent)
    assert artifact.content.file.read() == body.strip().encode()
    assert artifact.size == len(body.strip().encode())


def test_a_suite_file_is_cut_before_it_is_copied_into_every_case() -> None:
    report = (
        b'<testsuite name="s" file="' + b"f" * 5000 + b'">' + b'<testcase name="t"/>' * 3
    ) + b"</testsuite>"
    for result in results(report, chunk=4096):
        assert len(result.metadata["fspath"]) == MAX_PATH + len(" [cut]")


def test_small_suite_properties_are_copied_big_ones_stored_once_on_the_run() -> None:
    small = b'<property name="arch" value="x86_64"/>'
    big = b"".join(
        b'<property name="java.p%d" value="%s"/>' % (n, b"v" * 100)
        for n in range(COPIED_PROPERTIES_BYTES // 100 + 1)
    )
    report = (
        b'<testsuites><testsuite name="a"><properties>' + small + b"</properties>"
        b'<testcase name="t1"/></testsuite>'
        b'<testsuite name="b"><properties>' + big + b"</properties>"
        b'<testcase name="t2"/></testsuite></testsuites>'
    )
    records = read(report, chunk=4096)
    run, first, second, update = records
    assert isinstance(run, RunRecord) and isinstance(update, RunUpdate)
    assert isinstance(first, ResultRecord) and isinstance(second, ResultRecord)
    assert first.metadata["arch"] == "x86_64"
    assert not any(key.startswith("java.") for key in second.metadata)
    assert update.metadata == {f"java.p{n}": "v" * 100 for n in range(len(update.metadata))}
    assert len(update.metadata) == COPIED_PROPERTIES_BYTES // 100 + 1


def test_property_names_are_cut() -> None:
    report = (
        b'<testsuite name="s"><testcase name="t"><properties><property name="'
        + b"n" * 2000
        + b'" value="v"/></properties></testcase></testsuite>'
    )
    (result,) = results(report, chunk=4096)
    assert [len(key) for key in result.metadata if key.startswith("n")] == [255 + len(" [cut]")]


@pytest.mark.parametrize(
    ("attributes", "warning"),
    [
        ('time="1.7e308"', "1 time= value(s) not a number of seconds from 0 to a year"),
        ('time="-3"', "(the first: '-3'): stored without one"),
        ('timestamp="9999-12-31T00:00:00"', "not dates from 1970 to a day from now"),
        ('timestamp="1969-12-31T23:00:00"', "the enclosing or upload time is used"),
    ],
)
def test_times_out_of_range_are_left_out_with_a_warning(attributes: str, warning: str) -> None:
    report = f'<testsuite name="s"><testcase name="t" {attributes}/></testsuite>'.encode()
    run, result, update = read(report, chunk=4096)
    assert isinstance(result, ResultRecord) and isinstance(update, RunUpdate)
    assert result.duration is None and result.start_time is None
    assert len(update.warnings) == 1 and warning in update.warnings[0]


def test_a_tag_with_too_many_attributes_is_refused_before_expat_builds_them() -> None:
    attributes = b" ".join(b'a%d=""' % n for n in range(2 * MAX_ATTRIBUTES))
    report = b'<testsuite name="s"><testcase ' + attributes + b"/></testsuite>"
    with pytest.raises(ReportError, match=f"more than {MAX_ATTRIBUTES} '='"):
        read(report, chunk=1024 * 1024)
