"""Sizing from measurements: what an import costs each component (worker pool process, worker
main process, PostgreSQL, Redis) in CPU and memory, how throughput scales with 1, 2 and 3
worker processes against one PostgreSQL and one Redis, and what that means for a deployment.

``./pants run benchmarks/ibutsu_benchmarks/sizing.py`` (``-- --quick`` for a smoke run)
prints deploy/README.md's "Sizing" section, in Markdown, built from the figures it measured;
progress goes to stderr.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from ibutsu_benchmarks import cpu
from ibutsu_benchmarks.common import fresh_services, say, use_machine_services
from ibutsu_benchmarks.data import cases, write_junit
from ibutsu_benchmarks.load_bench import IMPORT_QUEUE, queue_imports
from ibutsu_benchmarks.workers import own_redis, running_workers
from ibutsu_server.db.models import utcnow
from ibutsu_worker.submission import Submitter

SMALL_CASES = 100
LARGE_CASES = 10_000
SEED = 4
# A worker process is sized to stay under this share of its CPU at the peak hour.
HEADROOM = 0.7
SCALING = (1, 2, 3)
EXAMPLES = ((50_000, 100), (10_000, 1000), (2000, 10_000), (200, 100_000))


@dataclass(frozen=True)
class Counts:
    """How many imports each measurement drains."""

    small: int = 1000
    large: int = 10
    scaling: int = 1500

    def quick(self) -> Counts:
        return Counts(small=self.small // 10, large=3, scaling=self.scaling // 10)


@dataclass(frozen=True)
class Drain:
    """Imports of one size drained by some workers: how fast, and what each component used."""

    processes: int
    imports: int
    cases: int
    seconds: float
    usage: cpu.Usage
    peak_mb: dict[str, float]

    @property
    def rate(self) -> float:
        return self.imports / self.seconds

    def per_import(self) -> dict[str, float]:
        return self.usage.per(self.imports)


def drain(folder: Path, processes: int, imports: int, case_count: int, seed: int = SEED) -> Drain:
    """Queue ``imports`` reports of ``case_count`` cases, then let ``processes`` workers of
    concurrency 1 drain them, on a fresh database and a Redis of our own."""
    report = folder / f"report-{case_count}.xml"
    if not report.exists():
        write_junit(report, cases(case_count, seed, utcnow().replace(microsecond=0)))
    with own_redis() as (url, redis_pid), fresh_services("sizing", url) as services:
        submitter = Submitter(services.settings)
        try:
            queue_imports(submitter, report, imports)
            with running_workers(services, redis_pid, folder, processes, concurrency=1) as workers:
                seconds, usage = workers.drain(IMPORT_QUEUE)
                peak = workers.peak_rss_mb()
        finally:
            submitter.celery.close()
            submitter.close()
    result = Drain(processes, imports, case_count, seconds, usage, peak)
    say(
        f"sizing: {processes} worker(s), {imports:,} imports of {case_count:,} cases: "
        f"{result.rate:.1f} imports/s; {usage.describe(imports, 'import')}"
    )
    return result


@dataclass(frozen=True)
class Costs:
    """CPU ms per import: a fixed part and a part per 1,000 results, by component."""

    fixed: dict[str, float]
    per_thousand: dict[str, float]
    peak_mb: dict[str, float]

    @classmethod
    def fit(cls, small: Drain, large: Drain) -> Costs:
        """The line through the two sizes' CPU per import, component by component."""
        low, high = small.per_import(), large.per_import()
        span = (large.cases - small.cases) / 1000
        per_thousand = {name: max((high[name] - low[name]) / span, 0.0) for name in low}
        fixed = {
            name: max(low[name] - per_thousand[name] * small.cases / 1000, 0.0) for name in low
        }
        peak = {name: max(small.peak_mb[name], large.peak_mb[name]) for name in small.peak_mb}
        return cls(fixed, per_thousand, peak)

    def ms(self, component: str, case_count: int) -> float:
        """CPU ms of one import of ``case_count`` cases in ``component``."""
        return self.fixed[component] + self.per_thousand[component] * case_count / 1000


def measure(counts: Counts, folder: Path) -> tuple[Drain, Drain, list[Drain]]:
    """The unit costs at two sizes, then the scaling runs."""
    small = drain(folder, 1, counts.small, SMALL_CASES)
    large = drain(folder, 1, counts.large, LARGE_CASES)
    scaling = [drain(folder, n, counts.scaling, SMALL_CASES) for n in SCALING]
    return small, large, scaling


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def section(small: Drain, large: Drain, scaling: Sequence[Drain], load: tuple[float, ...]) -> str:
    """deploy/README.md's Sizing section, from the measurements."""
    costs = Costs.fit(small, large)
    pool, main, pg, redis_ = cpu.POOL, cpu.MAIN, cpu.POSTGRES, cpu.REDIS
    worker = (pool, main)
    lines = [
        "## Sizing",
        "",
        f"Measured on {date.today().isoformat()} by "
        "`./pants run benchmarks/ibutsu_benchmarks/sizing.py`, which prints this section, on "
        f"the machine it ran on: **{os.cpu_count()} cores** ({_cpu_model()}), PostgreSQL, "
        "Redis and the workers on the same cores, shared with other work (load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} when it finished): read the figures as "
        "upper bounds. Reports are JUnit XML of the benchmarks' generator (10% of cases fail "
        "or error with a traceback, 10% have output).",
        "",
        "### What an import costs",
        "",
        f"CPU per import = fixed part + part per 1,000 results, fitted through "
        f"{small.imports:,} imports of {SMALL_CASES} cases and {large.imports:,} of "
        f"{LARGE_CASES:,}, drained by one worker process (concurrency 1):",
        "",
        "| Component | CPU ms per import (fixed) | CPU ms per 1,000 results | "
        f"CPU ms, {SMALL_CASES}-case import | peak memory |",
        "|---|---|---|---|---|",
    ]
    memory = {
        pool: f"{costs.peak_mb[pool]:.0f} MB RSS (one pool process)",
        main: f"{costs.peak_mb[main]:.0f} MB RSS",
        pg: "per connection: work_mem; rows go through shared_buffers",
        redis_: "about 2 kB per queued import; nothing once drained",
    }
    for name in cpu.COMPONENTS:
        lines.append(
            f"| {name} | {costs.fixed[name]:.1f} | {costs.per_thousand[name]:.1f} | "
            f"{costs.ms(name, SMALL_CASES):.1f} | {memory[name]} |"
        )
    lines += [
        "",
        "Each worker process holds one database connection per pool process and one to Redis "
        "for the main process. Memory does not grow with the report (the import benchmark "
        "checks 100,000 against 1,000,000 cases).",
        "",
        "### Scaling on this machine",
        "",
        f"{scaling[0].imports:,} imports of {SMALL_CASES} cases queued, then drained by 1, 2 "
        "and 3 worker processes of concurrency 1 against one PostgreSQL and one Redis; cores "
        "busy = CPU seconds over wall seconds:",
        "",
        "| Worker processes | imports/s | results/s | cores busy: workers | PostgreSQL | Redis | "
        "all |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in scaling:
        busy = run.usage.busy()
        workers_busy = busy[pool] + busy[main]
        lines.append(
            f"| {run.processes} | {run.rate:.0f} | {run.rate * SMALL_CASES:,.0f} | "
            f"{workers_busy:.2f} | {busy[pg]:.2f} | {busy[redis_]:.2f} | "
            f"{sum(busy.values()):.2f} |"
        )
    redis_ms, pg_ms = costs.ms(redis_, SMALL_CASES), costs.ms(pg, SMALL_CASES)
    lines += [
        "",
        _scaling_verdict(scaling),
        "",
        "### Ceilings",
        "",
        f"- **Redis** runs commands on one thread: {redis_ms:.2f} ms of CPU per "
        f"{SMALL_CASES}-case import here, so one Redis core tops out near "
        f"**{1000 / redis_ms:,.0f} imports/s**. Its messages do not grow with the report (they "
        "carry the import's id); what its fit charges per 1,000 results is time: heartbeats, "
        "events and polls (this benchmark's own, every 10 ms, among them) while a long import "
        "runs.",
        f"- **PostgreSQL** spends {costs.fixed[pg]:.1f} ms per import plus "
        f"{costs.per_thousand[pg]:.1f} ms per 1,000 results: each of its cores serves about "
        f"**{1000 / pg_ms:,.0f} imports/s of {SMALL_CASES} cases**, or "
        f"**{1000 / costs.ms(pg, 100_000) * 3600:,.0f} imports/hour of 100,000 cases**, "
        "before disk bandwidth (WAL, checkpoints) is counted; size its cores and disk first.",
        "- **Workers** scale out: each process adds the throughput above until PostgreSQL's "
        "cores are busy.",
        "",
        "### Worker replicas, requests and limits",
        "",
        "For N uploads per hour of M cases: worker cores = N / 3600 * (worker CPU ms per "
        f"import of M cases) / 1000; processes = that over {HEADROOM:.0%} (headroom for "
        "bursts), at least 2 for availability. A worker process (concurrency 1) asks "
        "for its average and is limited to one core; memory is its pool process's and main "
        "process's peak with a margin. Seconds per import: one import's CPU in the worker and "
        "PostgreSQL, which run in turn (its latency on an idle system). Bursts queue in Redis "
        "and drain at the rate above.",
        "",
        "| N uploads/hour | M cases | seconds per import | worker cores (average) | "
        "worker processes | CPU request per process | PostgreSQL cores (average) | "
        "Redis core share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for uploads, case_count in EXAMPLES:
        worker_cores = uploads / 3600 * sum(costs.ms(n, case_count) for n in worker) / 1000
        processes = max(2, math.ceil(worker_cores / HEADROOM))
        pg_cores = uploads / 3600 * costs.ms(pg, case_count) / 1000
        redis_share = uploads / 3600 * costs.ms(redis_, case_count) / 1000
        request = max(100, math.ceil(worker_cores / processes * 10) * 100)
        seconds = sum(costs.ms(n, case_count) for n in (*worker, pg)) / 1000
        lines.append(
            f"| {uploads:,} | {case_count:,} | {seconds:.2f} | {worker_cores:.2f} | "
            f"{processes} | {request}m | {pg_cores:.2f} | {redis_share:.1%} |"
        )
    memory_request = costs.peak_mb[pool] + costs.peak_mb[main]
    lines += [
        "",
        f"Per worker process (`CELERY_WORKER_CONCURRENCY=1`): requests the CPU above and "
        f"`memory: {_mib(memory_request)}Mi`; limits `cpu: 1`, "
        f"`memory: {_mib(memory_request * 1.5 + 100)}Mi` (the largest report the limits allow "
        "costs the pool process no more than a small one: memory is flat in the report's "
        "size). With concurrency C in one pod, multiply the pool process's share by C.",
    ]
    return "\n".join(lines) + "\n"


def _scaling_verdict(scaling: Sequence[Drain]) -> str:
    """What the scaling runs show, in words drawn from their figures."""
    cores = os.cpu_count() or 1
    rates = ", ".join(f"{run.rate:.0f}" for run in scaling)
    last = scaling[-1]
    busy = last.usage.busy()
    everything = sum(busy.values())
    share = {name: value / everything for name, value in busy.items()} if everything else busy
    text = (
        f"Imports/s with {', '.join(str(run.processes) for run in scaling)} processes: {rates}. "
        f"With {last.processes}, our processes kept {everything:.2f} of the {cores} cores busy "
        f"(workers {share[cpu.POOL] + share[cpu.MAIN]:.0%}, PostgreSQL {share[cpu.POSTGRES]:.0%}, "
        f"Redis {share[cpu.REDIS]:.0%} of that). "
    )
    if everything >= 0.8 * cores:
        text += (
            "**The machine's cores saturate first**: PostgreSQL and the workers share them, "
            "so a further process only adds contention; Redis is far from its limit. "
        )
    else:
        text += (
            "The cores were not all ours: other work on the machine (the load average above) "
            "took the rest, so the processes waited for a core, and **CPU saturated first**, "
            "before Redis or PostgreSQL reached a limit of their own. "
        )
    return text + (
        "What two cores hide: with workers, PostgreSQL and Redis competing for the same two "
        "cores, this cannot show how throughput grows when each has cores of its own, how far "
        "PostgreSQL's parallelism goes, where lock or WAL contention on `results` would start, "
        "or the network round trips a real deployment adds to every statement and message "
        "(everything here is on loopback). Read the per-import costs above, not this table, "
        "to size a larger deployment."
    )


def _mib(megabytes: float) -> int:
    return int(math.ceil(megabytes * 1e6 / 2**20 / 16) * 16)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print the sizing section."""
    parser = argparse.ArgumentParser(prog="sizing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer imports")
    args = parser.parse_args(argv)
    use_machine_services()
    counts = Counts().quick() if args.quick else Counts()
    with tempfile.TemporaryDirectory(prefix="ibutsu-sizing-") as scratch:
        small, large, scaling = measure(counts, Path(scratch))
    print(section(small, large, scaling, os.getloadavg()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
