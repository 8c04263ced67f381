"""Crafted JUnit reports against a plain one of the same size: reading time and memory.

The crafted ones are the worst cases the reader must stay linear on: suites nested as deep
as allowed (each case used to cost one step per open suite), and a comment just under the
largest token expat is fed whole (expat 2.5 scans one token in quadratic time). The reader
runs in this process, fed in the import's 1 MiB slices; its peak allocation is traced."""

from __future__ import annotations

import statistics
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from ibutsu_benchmarks.common import Figure, Sizes, Target, say
from ibutsu_server.settings import ImportLimits
from ibutsu_worker.importing.job import CHUNK_SIZE
from ibutsu_worker.importing.junit import MAX_DEPTH, MAX_TOKEN_BYTES, JUnitReader

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


def _read(report: bytes) -> None:
    """Read ``report`` fed in the import's slices, as the import does."""
    chunks = (report[i : i + CHUNK_SIZE] for i in range(0, len(report), CHUNK_SIZE))
    for _ in JUnitReader(ImportLimits(max_results=10**8)).records(chunks):
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
