"""Crafted JUnit reports against a plain one of the same size: reading time and memory, and
what each would store.

The crafted ones are the worst cases the reader must stay linear on: suites nested as deep
as allowed (each case used to cost one step per open suite), and a comment just under the
largest token expat is fed whole (expat 2.5 scans one token in quadratic time). The reader
runs in this process, fed in the import's 1 MiB slices; its peak allocation is traced.

The footprint: each report is imported as the import job does it (reader, budget, landing)
into a database of the benchmark's own, with the upload metadata a CI job sends, and the
bytes its rows hold as text are measured before the transaction is rolled back. The crafted
ones repeat what an import copies into every result (a suite's file and properties), or
store the least possible per result, or are built to land just under the budget."""

from __future__ import annotations

import json
import statistics
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from ibutsu_benchmarks.common import Figure, Sizes, Target, fresh_services, say
from ibutsu_benchmarks.data import cases, write_junit
from ibutsu_server.db.models import Project, utcnow
from ibutsu_server.settings import ImportLimits
from ibutsu_worker.importing.budget import FLOOR, ROW_BYTES, Budget
from ibutsu_worker.importing.errors import ReportError
from ibutsu_worker.importing.job import CHUNK_SIZE
from ibutsu_worker.importing.junit import (
    COPIED_PROPERTIES_BYTES,
    MAX_DEPTH,
    MAX_PATH,
    MAX_TOKEN_BYTES,
    JUnitReader,
)
from ibutsu_worker.importing.landing import Upload, land

NAME = "hostile"
REPEATS = 3
CASE = b'<testcase classname="tests.test_mod.TestThing" name="test_%d" time="0.01"/>\n'


def _cases(size: int) -> bytes:
    parts, total, n = [], 0, 0
    while total < size:
        line = CASE % n
        parts.append(line)
        total += len(line)
        n += 1
    return b"".join(parts)


def plain(size: int) -> bytes:
    """One suite of cases."""
    return b'<testsuites><testsuite name="s">' + _cases(size) + b"</testsuite></testsuites>"


def nested(size: int) -> bytes:
    """The same cases inside suites nested as deep as the reader allows."""
    depth = MAX_DEPTH - 2
    return (
        b"<testsuites>"
        + b'<testsuite name="s">' * depth
        + _cases(size)
        + b"</testsuite>" * depth
        + b"</testsuites>"
    )


def big_token(size: int) -> bytes:
    """A comment just under the token limit, then cases up to the same size."""
    comment = b"<!--" + b"x" * (min(size, MAX_TOKEN_BYTES) - 1024) + b"-->"
    return (
        b'<testsuites><testsuite name="s">'
        + comment
        + _cases(max(size - len(comment), 0))
        + b"</testsuite></testsuites>"
    )


def _slices(report: bytes) -> Iterator[bytes]:
    return (report[i : i + CHUNK_SIZE] for i in range(0, len(report), CHUNK_SIZE))


def _read(report: bytes) -> None:
    """Read ``report`` fed in the import's slices, as the import does."""
    for _ in JUnitReader(ImportLimits(max_results=10**8)).records(_slices(report)):
        pass


def _seconds(report: bytes) -> float:
    started = time.perf_counter()
    _read(report)
    return time.perf_counter() - started


def _peak_mb(report: bytes) -> float:
    """The reader's peak allocation (expat's buffers included), in MB; traced on its own
    run, since tracing slows everything down."""
    tracemalloc.start()
    _read(report)
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return peak


def run(sizes: Sizes, folder: Path) -> list[Figure]:
    """Reading time and peak memory, and the stored footprint, of each crafted report
    against the plain one."""
    return _reading(sizes) + _footprints(sizes, folder)


def _reading(sizes: Sizes) -> list[Figure]:
    """Reading time and peak memory of each crafted report against the plain one."""
    size = sizes.hostile_report_bytes
    builders: dict[str, Callable[[int], bytes]] = {
        "plain": plain,
        f"suites nested {MAX_DEPTH - 2} deep": nested,
        "a comment of one token less 1 kB": big_token,
    }
    measured: dict[str, tuple[float, float]] = {}
    for label, build in builders.items():
        report = build(size)
        seconds = statistics.median(_seconds(report) for _ in range(REPEATS))
        measured[label] = (seconds, _peak_mb(report))
        say(
            f"{NAME}: {label}, {len(report) / 1e6:.0f} MB: {seconds:.2f} s, "
            f"peak {measured[label][1]:.1f} MB"
        )
    plain_seconds, plain_peak = measured.pop("plain")
    figures = []
    for label, (seconds, peak) in measured.items():
        figures.append(
            Figure(
                NAME,
                f"reading {size // 1_000_000} MB, {label}; ratio to plain",
                seconds,
                "s",
                baseline=plain_seconds,
                baseline_label="(plain)",
                ratio=seconds / plain_seconds,
                target=Target("ratio", "<=", 2.0),
            )
        )
        # Bounded whatever the report's size: a few times the largest token at most.
        figures.append(
            Figure(
                NAME,
                f"peak memory reading it, {label}",
                peak,
                "MB",
                baseline=plain_peak,
                baseline_label="(plain)",
                target=Target("value", "<", 50.0),
            )
        )
    return figures


# --- the stored footprint -----------------------------------------------------------------

# What a CI job sends with its upload (the API's metadata field), copied into every result.
CI_METADATA = {
    "jenkins": {
        "job_name": "acme-api-nightly",
        "build_number": "1234",
        "build_url": "https://jenkins.example.com/job/acme-api-nightly/1234/",
    },
    "env": "ci",
    "component": "api",
}
SUITE_FILE = b"f" * MAX_PATH  # as long as a suite's file may be and still be copied whole
# As many properties as may still be copied into every case of their suite.
COPIED = b"".join(
    b'<property name="p%d" value="%s"/>' % (n, b"v" * 95)
    for n in range(COPIED_PROPERTIES_BYTES // 100)
)


@dataclass(frozen=True)
class Footprint:
    """What one import stored: its outcome, its rows, and the bytes they hold as text."""

    outcome: str
    rows: int
    stored: int
    upload: int

    @property
    def ratio(self) -> float:
        return self.stored / self.upload

    @property
    def allowed(self) -> float:
        """The budget's bound on the ratio for this import."""
        limit = ImportLimits().max_footprint_ratio
        return limit + (ROW_BYTES * self.rows + FLOOR) / self.upload


def _plain(folder: Path, size: int, start: datetime) -> bytes:
    """The benchmarks' realistic report (pytest's shape, tracebacks and outputs), about
    ``size`` bytes."""
    path = folder / "footprint-plain.xml"
    write_junit(path, cases(1000, 1, start))
    per_case = path.stat().st_size / 1000
    write_junit(path, cases(max(int(size / per_case), 1), 1, start))
    return path.read_bytes()


def _suite(head: bytes, body: bytes, size: int) -> bytes:
    """A report of one suite opened by ``head`` holding ``body``, padded to ``size`` bytes
    with a comment (which nothing stores)."""
    report = b"<testsuites>" + head + body + b"</testsuite></testsuites>"
    padding = max(size - len(report) - 7, 0)
    return b"<testsuites><!--" + b" " * padding + b"-->" + report[len(b"<testsuites>") :]


def _empty_cases(size: int) -> bytes:
    """As many results as the bytes allow, each storing only what every row holds."""
    return _suite(b'<testsuite name="s">', b"<testcase/>" * (size // 11 - 10), size)


def _copied_file(size: int) -> bytes:
    """A suite's file, as long as is copied whole, over as many empty cases as fit."""
    head = b'<testsuite name="s" file="' + SUITE_FILE + b'">'
    return _suite(head, b"<testcase/>" * (size // 11 - 200), size)


def _many_properties(size: int) -> bytes:
    """1,000 properties of 5 kB on a suite of few cases (issue 18's row 12)."""
    properties = b"".join(
        b'<property name="%s" value="%s"/>' % (b"%04d" % n + b"n" * 1020, b"v" * 4096)
        for n in range(min(size // 5200, 1000))
    )
    head = b'<testsuite name="s"><properties>' + properties + b"</properties>"
    return _suite(head, b'<testcase classname="c" name="t"/>' * 100, size)


def _under_budget(size: int, cases_count: int) -> bytes:
    """The suite's file and properties copied into ``cases_count`` empty cases, padded."""
    head = b'<testsuite name="s" file="' + SUITE_FILE + b'"><properties>' + COPIED
    return _suite(head + b"</properties>", b"<testcase/>" * cases_count, size)


def _footprint(
    engine: Engine, project_id: uuid.UUID, report: bytes, metadata: dict[str, Any] = CI_METADATA
) -> Footprint:
    """Import ``report`` with the upload's ``metadata`` as the import job does, measure its
    rows, roll it all back."""
    limits = ImportLimits()
    upload_bytes = len(report) + len(json.dumps(metadata))
    upload = Upload(uuid.uuid4(), project_id, None, metadata, utcnow())
    with Session(engine) as session:
        records = JUnitReader(limits).records(_slices(report))
        try:
            landed = land(session, upload, records, Budget(limits, upload_bytes))
        except ReportError:
            session.rollback()
            return Footprint("refused", 0, 0, upload_bytes)
        session.flush()
        stored = session.scalar(
            text(
                "SELECT (SELECT octet_length(r::text) FROM runs r WHERE id = :run)"
                " + (SELECT coalesce(sum(octet_length(r::text)), 0) FROM results r"
                " WHERE run_id = :run) + (SELECT coalesce(sum(octet_length(a.content)"
                " + octet_length(a.filename) + octet_length(a.data::text)), 0) FROM artifacts a"
                " WHERE a.result_id IN (SELECT id FROM results WHERE run_id = :run))"
            ),
            {"run": landed.run_id},
        )
        session.rollback()
    return Footprint("done", landed.results + 1, int(stored or 0), upload_bytes)


def _just_under_budget(engine: Engine, project_id: uuid.UUID, size: int) -> Footprint:
    """The copies built to land as close to the budget as they can: the number of cases is
    estimated from a small import, then lowered until the import is accepted."""
    probe = _footprint(engine, project_id, _under_budget(size, 100))
    per_row = (probe.stored - _footprint(engine, project_id, _under_budget(size, 0)).stored) / 100
    limit = ImportLimits().max_footprint_ratio
    count = int((limit * probe.upload + FLOOR) / (per_row - ROW_BYTES) * 0.98)
    while (found := _footprint(engine, project_id, _under_budget(size, count))).stored == 0:
        count = int(count * 0.95)
    return found


def _footprints(sizes: Sizes, folder: Path) -> list[Figure]:
    """Stored bytes over upload bytes of the plain report and the crafted ones."""
    size = sizes.hostile_report_bytes // 4
    start = utcnow().replace(microsecond=0)
    with fresh_services(f"{NAME}-footprint") as services:
        with Session(services.engine) as session:
            project = Project(id=uuid.uuid4(), name="bench", title="bench")
            session.add(project)
            session.commit()
            project_id = project.id
        engine = services.engine
        found = {
            "plain": _footprint(engine, project_id, _plain(folder, size, start)),
            "empty cases": _footprint(engine, project_id, _empty_cases(size)),
            # The least a result can store, nothing copied: all of it the fixed part of a row.
            "empty cases, no upload metadata": _footprint(
                engine, project_id, _empty_cases(size), {}
            ),
            "a 1 kB suite file over empty cases": _footprint(
                engine, project_id, _copied_file(size)
            ),
            "1,000 suite properties of 5 kB": _footprint(
                engine, project_id, _many_properties(size)
            ),
            "file and properties copied, just under the budget": _just_under_budget(
                engine, project_id, size
            ),
        }
    plain = found.pop("plain")
    say(f"{NAME}: footprint of plain: {plain}")
    figures = [
        Figure(
            NAME,
            f"stored/upload bytes, plain {size / 1e6:.1f} MB report with CI metadata (info)",
            plain.ratio,
            "x",
        )
    ]
    for label, footprint in found.items():
        say(f"{NAME}: footprint of {label}: {footprint}")
        outcome = "refused, nothing stored" if footprint.outcome == "refused" else "done"
        figures.append(
            Figure(
                NAME,
                f"stored/upload bytes, {label}: {outcome}; bound {footprint.allowed:.1f}",
                footprint.ratio,
                "x",
                baseline=plain.ratio,
                baseline_label="(plain)",
                ratio=footprint.ratio / plain.ratio,
                target=Target("value", "<=", footprint.allowed),
            )
        )
    return figures
