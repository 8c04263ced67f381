"""Real workers for the benchmarks that time tasks through the broker, on a Redis of the
benchmark's own, with a gate: workers start on a queue nothing is sent to and are told to
consume a queue only once its batch waits there, so the clock runs from a full queue to an
empty one, start-up left out, and the same worker processes serve every batch."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

from ibutsu_benchmarks import cpu
from ibutsu_benchmarks.common import Services
from ibutsu_server.broker_keys import BrokerKeys
from ibutsu_server.celery_utils import IbutsuCelery, create_celery
from ibutsu_testing.private import private_redis
from ibutsu_testing.services import running_worker, wait_for

# The worker app as deployed, plus the benchmarks' reference tasks (named here: the
# benchmarks' own process must not build a worker app).
APP = "ibutsu_benchmarks.worker_app:app"
NOOP = "ibutsu_benchmarks.noop"
EMPTY = "ibutsu_benchmarks.empty"
ONE_STATEMENT = "ibutsu_benchmarks.one_statement"
IDLE_QUEUE = "ibutsu-bench-idle"
POLL_SECONDS = 0.01
DRAIN_TIMEOUT = 3600.0


@dataclass
class Workers:
    """Running workers, the producer that feeds them, and the meter of every process."""

    services: Services
    producer: IbutsuCelery
    meter: cpu.CpuMeter
    pids: list[int]
    client: redis.Redis

    def drain(self, queue: str) -> tuple[float, cpu.Usage]:
        """Let the workers consume ``queue`` until it is empty and nothing of it is
        unacknowledged (with late acknowledgement: every task has finished): the seconds from
        the first message taken to the last one finished, and the CPU every process used.

        The clock starts at the first message taken, not at the order to consume: a worker
        waiting on its idle queue hears of the new one only when its blocking pop times out."""
        keys = BrokerKeys(prefix=self.services.key_prefix)
        waiting, unacked = keys.queue(queue), keys.unacked
        queued = int(self.client.llen(waiting))

        def taken() -> bool:
            return int(self.client.llen(waiting)) < queued

        def drained() -> bool:
            pipeline = self.client.pipeline()
            pipeline.llen(waiting)
            pipeline.hlen(unacked)
            left, held = pipeline.execute()
            return int(left) == 0 and int(held) == 0

        self.meter.start()
        self.producer.control.add_consumer(queue, reply=True)
        wait_for(taken, timeout=DRAIN_TIMEOUT, interval=POLL_SECONDS)
        started = time.perf_counter()
        wait_for(drained, timeout=DRAIN_TIMEOUT, interval=POLL_SECONDS)
        seconds = time.perf_counter() - started
        usage = self.meter.stop()
        self.producer.control.cancel_consumer(queue, reply=True)
        return seconds, usage

    def peak_rss_mb(self) -> dict[str, float]:
        """The highest resident memory (VmHWM) of any pool child and of any main process."""
        children = [child for pid in self.pids for child in cpu.children(pid)]
        return {
            cpu.POOL: max(cpu.status_mb(pid, "VmHWM") for pid in children),
            cpu.MAIN: max(cpu.status_mb(pid, "VmHWM") for pid in self.pids),
        }


@contextmanager
def own_redis() -> Iterator[tuple[str, int]]:
    """A Redis of the benchmark's own, persisting nothing (as the machine's): its URL and pid,
    so its CPU is the benchmark's alone."""
    with private_redis(durable=False) as server:
        assert server.process is not None
        yield server.url, server.process.pid


@contextmanager
def running_workers(
    services: Services, redis_pid: int, folder: Path, processes: int = 1, concurrency: int = 2
) -> Iterator[Workers]:
    """``processes`` workers of ``concurrency`` pool processes each, idle until drained."""
    env = {**services.env, "CELERY_WORKER_CONCURRENCY": str(concurrency)}
    producer = create_celery(services.settings)
    backends = cpu.postgres_backends(services.engine)
    client = redis.Redis.from_url(services.redis_url)
    try:
        with ExitStack() as stack:
            pids = [
                stack.enter_context(
                    running_worker(APP, env, folder / f"worker-{n}.log", f"--queues={IDLE_QUEUE}")
                ).pid
                for n in range(processes)
            ]
            meter = cpu.CpuMeter(cpu.worker_sources(pids, backends, redis_pid))
            yield Workers(services, producer, meter, pids, client)
    finally:
        client.close()
        backends.close()  # type: ignore[attr-defined]
        producer.close()
