"""The broker transport's own cost per message: a consumer takes and acknowledges messages one
at a time (prefetch 1, as a worker), through our transport (a blocking peek, then one Lua
script that takes the message and records it as held) and through Kombu's own (``BRPOP``, then
a pipeline that records it), on the same Redis, in the same run, alternating rounds; medians.
Nothing else runs: no task, no database."""

from __future__ import annotations

import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from kombu.connection import Connection
from kombu.entity import Queue
from kombu.messaging import Consumer, Producer

from ibutsu_benchmarks.common import Figure, Sizes, Target, say
from ibutsu_server import broker_transport
from ibutsu_testing.services import clear_redis_prefix, redis_url

NAME = "transport"
ROUNDS = 3
OURS = "ibutsu_server.broker_transport:Transport"
STOCK = "kombu.transport.redis:Transport"
# A message as small as an import's: the import record and Celery's headers.
BODY = {"id": str(uuid.uuid4()), "filename": "report.xml", "metadata": {"project_id": "x" * 36}}


def _round(transport: str, messages: int, prefix: str) -> float:
    """Messages per second taken and acknowledged through ``transport``."""
    queue_name = f"bench-{uuid.uuid4().hex[:8]}"
    options = {"global_keyprefix": prefix, "visibility_timeout": 90}
    with Connection(redis_url(), transport=transport, transport_options=options) as connection:  # type: ignore[no-untyped-call]
        queue = Queue(queue_name, routing_key=queue_name)  # type: ignore[no-untyped-call]
        producer = Producer(connection.default_channel)  # type: ignore[no-untyped-call]
        for _ in range(messages):
            producer.publish(BODY, routing_key=queue_name, declare=[queue], serializer="json")  # type: ignore[no-untyped-call]
        taken = 0

        def take(_body: Any, message: Any) -> None:
            nonlocal taken
            message.ack()
            taken += 1

        channel = connection.channel()
        channel.basic_qos(prefetch_size=0, prefetch_count=1)
        started = time.perf_counter()
        with Consumer(channel, [queue], callbacks=[take], accept=["json"]):  # type: ignore[no-untyped-call]
            while taken < messages:
                connection.drain_events(timeout=10)
        elapsed = time.perf_counter() - started
        channel.close()
    return messages / elapsed


def run(sizes: Sizes, _folder: Path) -> list[Figure]:
    """ROUNDS rounds of ``sizes.transport_messages`` messages through each transport."""
    broker_transport.install()  # as every role does (the aliases), though named here
    messages = sizes.transport_messages
    prefix = f"ibutsu-bench-{NAME}-{uuid.uuid4().hex[:8]}:"
    ours, stock = [], []
    try:
        for number in range(ROUNDS):
            stock.append(_round(STOCK, messages, prefix))
            ours.append(_round(OURS, messages, prefix))
            say(f"{NAME}: round {number + 1}: ours {ours[-1]:.0f}/s, Kombu's {stock[-1]:.0f}/s")
    finally:
        clear_redis_prefix(prefix)
    ours_median, stock_median = statistics.median(ours), statistics.median(stock)
    return [
        Figure(
            NAME,
            f"{messages:,} messages taken and acknowledged one at a time (median of {ROUNDS})",
            ours_median,
            "msg/s",
            baseline=stock_median,
            baseline_label="(Kombu's own)",
            ratio=ours_median / stock_median,
            target=Target("ratio", ">=", 0.8),
        )
    ]
