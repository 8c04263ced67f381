"""The cluster's series from events: workers up and down, every send counted once, waits."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ibutsu_scheduler.cluster_metrics import FORGET_SECONDS, OFFLINE_FORGET_SECONDS, ClusterState
from ibutsu_server.task_names import IMPORT_RESULTS, UPDATE_RUN


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(*labels: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels))


def samples(state: ClusterState, lengths: dict[str, int] | None = None) -> dict[Any, float]:
    """name and sorted labels → value, as Prometheus would scrape them."""
    registry = CollectorRegistry()

    class Adapter:
        def collect(self) -> Any:
            return state.collect(lengths or {})

    registry.register(Adapter())
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_workers_up_down_and_forgotten() -> None:
    clock = Clock()
    state = ClusterState(clock)
    # Labelled by host, as celery-exporter labels them: "celery@w1" is "w1".
    state.record({"type": "worker-online", "hostname": "celery@w1", "freq": 2.0})
    state.record({"type": "worker-heartbeat", "hostname": "celery@w2", "freq": 2.0})

    def up(host: str) -> float | None:
        return samples(state).get(("celery_worker_up", (("hostname", host),)))

    assert (up("w1"), up("w2")) == (1, 1)
    state.record({"type": "worker-offline", "hostname": "celery@w1"})  # stopped on purpose
    clock.now += 9
    assert (up("w1"), up("w2")) == (0, 1)
    clock.now += 2  # w2 missed five heartbeats: killed, no goodbye
    assert up("w2") == 0
    state.record({"type": "worker-heartbeat", "hostname": "celery@w2", "freq": 2.0})
    assert up("w2") == 1
    # A second worker on w2's host: one series, down while either is.
    state.record({"type": "worker-heartbeat", "hostname": "other@w2", "freq": 1.0})
    clock.now += 6
    state.record({"type": "worker-heartbeat", "hostname": "celery@w2", "freq": 2.0})
    assert up("w2") == 0
    state.record({"type": "worker-offline", "hostname": "other@w2"})
    clock.now += OFFLINE_FORGET_SECONDS  # a goodbye is forgotten before alerts fire
    assert (up("w1"), up("w2")) == (None, 0)
    assert len([k for k in samples(state) if k[0] == "celery_worker_up"]) == 1
    clock.now += FORGET_SECONDS  # a silent death stays down long enough to be noticed
    assert up("w2") is None


def test_every_send_counted_once_and_the_wait_from_send_to_start() -> None:
    state = ClusterState(Clock())
    send = {"type": "task-sent", "name": IMPORT_RESULTS, "hostname": "gen7@cli-host"}
    state.record({**send, "uuid": "a", "queue": "celery", "timestamp": 100.0})
    state.record({"type": "task-received", "uuid": "a", "name": IMPORT_RESULTS})
    started = {"type": "task-started", "hostname": "celery@worker-1"}
    state.record({**started, "uuid": "a", "timestamp": 100.7})
    # Upstream's API sends no events: its task is counted when a worker receives it, once,
    # however many times the message is delivered, its producer named by the origin our
    # worker adds; a worker that adds none (upstream's) leaves it unknown.
    for _ in range(2):
        received = {"type": "task-received", "uuid": "b", "name": UPDATE_RUN}
        state.record({**received, "origin": "gen42@ibutsu-api-1"})
    state.record({**started, "uuid": "b", "timestamp": 200.0})
    state.record({"type": "task-received", "uuid": "c", "name": UPDATE_RUN})
    state.record({"type": "task-received", "uuid": "d", "name": "made.up.name"})
    found = samples(state, {"celery": 7})

    def sent(name: str, hostname: str) -> float:
        labels = key(("name", name), ("hostname", hostname), ("queue_name", "celery"))
        return found[("celery_task_sent_total", labels)]

    assert (sent(IMPORT_RESULTS, "cli-host"), sent(UPDATE_RUN, "ibutsu-api-1")) == (1, 1)
    assert sent(UPDATE_RUN, "unknown") == 1
    assert sent("unknown", "unknown") == 1  # a name no worker registers is no label
    wait = key(("name", IMPORT_RESULTS), ("hostname", "worker-1"), ("queue_name", "celery"))
    assert found[("celery_task_queue_wait_time_count", wait)] == 1
    assert abs(found[("celery_task_queue_wait_time_sum", wait)] - 0.7) < 1e-9
    assert found[("celery_task_queue_wait_time_bucket", key(*wait, ("le", "0.5")))] == 0
    assert found[("celery_task_queue_wait_time_bucket", key(*wait, ("le", "1.0")))] == 1
    # No send event, no wait: it cannot be known.
    waits = [k for k in found if k[0].startswith("celery_task_queue_wait")]
    assert waits and not [k for k in waits if ("name", UPDATE_RUN) in k[1]]
    assert found[("celery_queue_length", (("queue_name", "celery"),))] == 7


def test_a_send_told_of_late_is_counted_once_and_a_retry_again() -> None:
    """The worker's task-received, even its task-started, may reach the leader before the
    producer's task-sent (two hosts' events race): one send, counted once, its wait known;
    the retry is a send again."""
    state = ClusterState(Clock())
    base = {"uuid": "a", "name": IMPORT_RESULTS, "retries": 0}
    received = {**base, "type": "task-received", "origin": "gen7@cli-host"}
    sent = {**base, "type": "task-sent", "hostname": "gen7@cli-host", "timestamp": 100.0}
    started = {**base, "type": "task-started", "hostname": "w@h", "timestamp": 101.0}
    state.record(received)
    state.record(started)
    state.record(sent)
    # The worker retries it: sent again, by the worker, received and started again.
    state.record({**sent, "hostname": "w@h", "retries": 1, "timestamp": 102.0})
    state.record({**received, "retries": 1})
    state.record({**started, "retries": 1, "timestamp": 102.5})
    found = samples(state)
    labels = key(("name", IMPORT_RESULTS), ("queue_name", "celery"))
    assert found[("celery_task_sent_total", key(*labels, ("hostname", "cli-host")))] == 1
    assert found[("celery_task_sent_total", key(*labels, ("hostname", "h")))] == 1
    wait = key(*labels, ("hostname", "h"))
    assert found[("celery_task_queue_wait_time_count", wait)] == 2
    assert found[("celery_task_queue_wait_time_sum", wait)] == 1.5


def test_a_countdown_is_no_wait() -> None:
    """A task sent with an ETA (a countdown, a retry's backoff) waits from its ETA."""
    state = ClusterState(Clock())
    eta = datetime.fromtimestamp(160.0, tz=UTC).isoformat()
    sent = {"type": "task-sent", "uuid": "a", "name": IMPORT_RESULTS, "hostname": "gen1@h"}
    state.record({**sent, "timestamp": 100.0, "eta": eta, "utcoffset": 0})
    state.record({"type": "task-started", "uuid": "a", "hostname": "w@h", "timestamp": 160.2})
    wait = key(("name", IMPORT_RESULTS), ("hostname", "h"), ("queue_name", "celery"))
    assert abs(samples(state)[("celery_task_queue_wait_time_sum", wait)] - 0.2) < 1e-6


def test_queue_consumers() -> None:
    clock = Clock()
    state = ClusterState(clock, queues=["celery"])
    # Not asked yet: no answer is not zero.
    assert not [k for k in samples(state) if k[0].startswith("celery_active_")]

    def counts() -> tuple[float, float, float]:
        found = samples(state)
        queue = (("queue_name", "celery"),)
        return (
            found[("celery_active_worker_count", queue)],
            found[("celery_active_process_count", queue)],
            found[("celery_active_consumer_count", queue)],
        )

    state.set_consumers({}, {})  # nobody answered: every queue counts 0, as celery-exporter's
    assert counts() == (0, 0, 0)
    assert not state.unanswered()
    for node in ("celery@a", "celery@b"):
        state.record({"type": "worker-heartbeat", "hostname": node, "freq": 2.0})
    assert state.unanswered()  # workers up that were not asked: ask again soon
    consumed = [{"name": "celery"}]
    pool = {"pool": {"max-concurrency": 4, "processes": [11, 12, 13, 14]}}
    state.set_consumers({"celery@a": consumed, "celery@b": consumed}, {"celery@a": pool})
    assert counts() == (2, 4, 2)
    assert not state.unanswered()
    state.record({"type": "worker-offline", "hostname": "celery@b"})
    assert counts() == (1, 4, 1)  # a worker that said goodbye consumes no more
    clock.now += 11  # and one whose heartbeats stopped neither
    assert counts() == (0, 0, 0)
