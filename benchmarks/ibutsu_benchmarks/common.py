"""What every benchmark shares: sizes, services of its own, progress, and reported figures."""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from sqlalchemy import Engine

from ibutsu_server.db.engine import make_engine
from ibutsu_server.db.migrate import upgrade
from ibutsu_server.settings import Settings
from ibutsu_testing.services import (
    clear_redis_prefix,
    postgres_database,
    redis_url,
    service_env,
    settings_for,
)

QUICK_DIVISOR = 10
_STARTED = time.monotonic()
# How each unit is printed; the table and the targets use the same formats.
UNIT_FORMATS = {
    "results/s": "{:,.0f} results/s",
    "MB": "{:.1f} MB",
    "s": "{:.2f} s",
    "ms": "{:.1f} ms",
    "imports/s": "{:,.0f} imports/s",
    "x": "{:.2f}x",
    "tasks/s": "{:,.0f} tasks/s",
    "msg/s": "{:,.0f} msg/s",
}


def use_machine_services() -> None:
    """Point ibutsu_testing.services at the machine's PostgreSQL (127.0.0.1:5432) and Redis
    (127.0.0.1:6379), unless IBUTSU_TEST_* name others: the figures are those of a real,
    durable database, not of the throwaway servers (no fsync, small buffers) the tests start.
    Called before any service is used."""
    os.environ.setdefault("IBUTSU_TEST_PG_HOST", "127.0.0.1")
    os.environ.setdefault("IBUTSU_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def say(message: str) -> None:
    """One progress line on stderr, stamped with the seconds since the benchmarks started."""
    print(f"[{time.monotonic() - _STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


def count_label(count: int) -> str:
    """A row count as the table prints it: 1M, 100k, or 1,234."""
    if count % 1_000_000 == 0:
        return f"{count // 1_000_000}M"
    return f"{count // 1000}k" if count % 1000 == 0 else f"{count:,}"


def show(value: float, unit: str) -> str:
    """``value`` in ``unit`` as the table prints it."""
    return UNIT_FORMATS[unit].format(value)


@dataclass(frozen=True)
class Sizes:
    """How much data each benchmark uses; the defaults are the full-size run."""

    import_cases: int = 100_000
    import_big_cases: int = 1_000_000
    import_repeats: int = 3
    prune_results: int = 1_000_000
    prune_repeats: int = 3
    summary_table_results: int = 1_000_000
    summary_run_results: int = 100_000
    summary_repeats: int = 5
    hostile_report_bytes: int = 20_000_000
    load_imports: int = 10_000
    load_floor_tasks: int = 2000
    load_floor_copies: int = 500
    overhead_tasks: int = 3000  # a multiple of the slices
    overhead_repeats: int = 3
    transport_messages: int = 10_000

    def quick(self) -> Sizes:
        """The smoke-test sizes: every count divided by QUICK_DIVISOR, as many repeats."""
        return replace(
            self,
            import_cases=self.import_cases // QUICK_DIVISOR,
            import_big_cases=self.import_big_cases // QUICK_DIVISOR,
            prune_results=self.prune_results // QUICK_DIVISOR,
            summary_table_results=self.summary_table_results // QUICK_DIVISOR,
            summary_run_results=self.summary_run_results // QUICK_DIVISOR,
            hostile_report_bytes=self.hostile_report_bytes // QUICK_DIVISOR,
            load_imports=self.load_imports // QUICK_DIVISOR,
            load_floor_tasks=self.load_floor_tasks // QUICK_DIVISOR,
            load_floor_copies=self.load_floor_copies // QUICK_DIVISOR,
            overhead_tasks=self.overhead_tasks // QUICK_DIVISOR,
            transport_messages=self.transport_messages // QUICK_DIVISOR,
        )


@dataclass(frozen=True)
class Target:
    """A bound on a figure's measured value, or on its ratio to the baseline."""

    subject: Literal["value", "ratio"]
    op: Literal["<", "<=", ">="]
    bound: float

    def met(self, value: float, ratio: float | None) -> bool:
        subject = value if self.subject == "value" else ratio
        if subject is None:
            raise ValueError("a ratio target needs a ratio")
        if self.op == "<":
            return subject < self.bound
        if self.op == "<=":
            return subject <= self.bound
        return subject >= self.bound

    def describe(self, unit: str) -> str:
        if self.subject == "value":
            return f"{self.op} {show(self.bound, unit)}"
        return f"ratio {self.op} {self.bound:.2f}"


@dataclass(frozen=True)
class Figure:
    """One line of the summary: a measurement, its baseline from the same run, its target."""

    benchmark: str
    metric: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_label: str = ""
    ratio: float | None = None
    target: Target | None = None

    @property
    def verdict(self) -> str:
        """PASS or MISS against the target; '-' for a figure shown for information."""
        if self.target is None:
            return "-"
        return "PASS" if self.target.met(self.value, self.ratio) else "MISS"

    def cells(self) -> list[str]:
        """The figure's columns in the printed table."""
        baseline = "-"
        if self.baseline is not None:
            baseline = f"{show(self.baseline, self.unit)} {self.baseline_label}".rstrip()
        return [
            self.benchmark,
            self.metric,
            show(self.value, self.unit),
            baseline,
            "-" if self.ratio is None else f"{self.ratio:.2f}",
            "-" if self.target is None else self.target.describe(self.unit),
            self.verdict,
        ]

    def as_json(self) -> dict[str, Any]:
        """The figure with raw numbers, for ``--json``."""
        return {
            **asdict(self),
            "target": None if self.target is None else asdict(self.target),
            "verdict": self.verdict,
        }


@dataclass(frozen=True)
class Services:
    """A benchmark's own database (migrated) and Redis namespace, and a worker's environment
    pointing at them."""

    env: dict[str, str]
    settings: Settings
    engine: Engine
    redis_url: str
    key_prefix: str


@contextmanager
def fresh_services(benchmark: str, own_redis_url: str | None = None) -> Iterator[Services]:
    """A new PostgreSQL database migrated to the newest schema (so the real indexes are in
    place) and a Redis key prefix of its own, on the machine's Redis or on ``own_redis_url``
    (a Redis of the benchmark's own, whose CPU is all the benchmark's); dropped and cleared
    afterwards."""
    prefix = f"ibutsu-bench-{benchmark}-{uuid.uuid4().hex[:8]}:"
    url = own_redis_url or redis_url()
    try:
        with postgres_database() as database:
            env = service_env(database, prefix, CELERY_BROKER_URL=url, CELERY_RESULT_BACKEND=url)
            settings = settings_for(env)
            assert settings.database is not None  # the worker role always has one
            engine = make_engine(settings.database)
            try:
                upgrade(engine)
                yield Services(env, settings, engine, url, prefix)
            finally:
                engine.dispose()
    finally:
        if own_redis_url is None:
            clear_redis_prefix(prefix)
