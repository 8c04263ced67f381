"""Kombu's Redis transport for every kind of Redis (``redis://``, ``rediss://``,
``sentinel://``), with what a worker needs that Kombu lacks. Every role uses it.

- **Taking a message is one atomic step.** Kombu pops a message off its queue (``BRPOP``) and
  records it as held (in the ``unacked`` hash and the ``unacked_index`` sorted set) in a second
  command: a connection lost between the two loses the message. Here the consumer waits with
  a blocking peek that takes nothing (``BLMOVE q q RIGHT RIGHT``: the tail moves onto itself),
  then takes the message with one Lua script (CLAIM) that pops it and records it where Kombu
  records it, in Kombu's own format. A reply lost on the way leaves the message in the queue
  (the peek) or recorded as held (the claim): never nowhere. A held message nobody works on
  comes back after the visibility timeout.
- **We restore only what we hold.** During a rolling update upstream's workers (plain Kombu,
  early acknowledgement, prefetch 4, Kombu's 3,600 s visibility timeout) share the queue. What
  our workers take is also marked in a sorted set of our own (``unacked_leased``), and our
  workers renew those marks and their index entries while they hold them
  (``ibutsu_worker.process.leases``). The periodic scan hands back a message of ours once its
  lease
  has not been renewed for our visibility timeout (90 s: its worker is dead), and a foreign
  message only once Kombu's default timeout (FOREIGN_VISIBILITY_TIMEOUT) has passed, as
  upstream's own workers would. Upstream's scan never takes ours while we renew them, and if
  every worker of ours is gone (a rollback) it hands ours back like its own: they are stored in
  its format, only marked besides.
- **One Redis client per channel, not one per command.** Outside its event loop Kombu builds a
  new redis-py client for each command it sends (every event, every acknowledgement), which
  made client construction a tenth of a busy worker's main-process CPU. A channel here keeps
  one client for as long as it keeps its connection pool.
- **A lost broker never kills the worker.** When the connection drops, Kombu closes the
  channel; putting back its messages, or a late acknowledgement on the closed channel, fails
  inside Kombu with an ``AttributeError``, which Celery treats as fatal. Here a closed channel
  raises a connection error, which Celery expects, and the messages stay held, to come back
  after the visibility timeout to tasks that find their work done. A server demoted to replica
  (``READONLY``) is a lost connection too (ibutsu_server.redis_connections).
- **A failover never fails a finished task.** The result backend stores a task's state again
  while Redis cannot be reached, for a bounded time, instead of failing a task whose work is
  done.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty
from time import monotonic, sleep, time
from typing import Any

import redis
from celery.app import backends as celery_backends
from celery.backends.redis import RedisBackend, SentinelBackend
from kombu.transport import TRANSPORT_ALIASES, virtual
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from redis import exceptions as redis_errors

from ibutsu_server import redis_connections
from ibutsu_server.broker_keys import LEASED, BrokerKeys

log = logging.getLogger(__name__)

#: How long a message taken by a worker that is not ours (upstream's, plain Kombu) stays its
#: own: Kombu's default visibility timeout, which upstream's workers use.
FOREIGN_VISIBILITY_TIMEOUT = 3600
#: Marks of ours whose message is gone from Kombu's index (a plain Kombu worker handed it
#: back, after a rollback) are dropped after this long, a few at a time.
STALE_MARK_SECONDS = 2 * FOREIGN_VISIBILITY_TIMEOUT
#: A task's state is stored again while Redis cannot be reached, for this long (a Sentinel
#: failover takes seconds), pausing from the first pause, doubled each time, to the longest.
RESULT_STORE_PATIENCE_SECONDS = 30.0
RESULT_STORE_FIRST_PAUSE = 0.1
RESULT_STORE_LONGEST_PAUSE = 2.0

# KEYS: unacked hash, unacked index, leased set, then the queue keys in the order to try.
# ARGV: now, then for each queue key "1" to record it as held (acknowledged later) or "0"
# (a consumer without acknowledgements). Pops one message and records it as Kombu's QoS.append
# does: hash value [payload, exchange, routing key] with the payload exactly as it was queued.
# Returns {key index (1-based among the queue keys), payload} or nil.
CLAIM = """
for i = 4, #KEYS do
  local payload = redis.call('RPOP', KEYS[i])
  if payload then
    if ARGV[i - 2] == '1' then
      local ok, message = pcall(cjson.decode, payload)
      local tag, exchange, routing_key = nil, cjson.null, cjson.null
      if ok and type(message) == 'table' and type(message.properties) == 'table' then
        tag = message.properties.delivery_tag
        local info = message.properties.delivery_info
        if type(info) == 'table' then
          if info.exchange ~= nil then exchange = info.exchange end
          if info.routing_key ~= nil then routing_key = info.routing_key end
        end
      end
      if type(tag) == 'string' then
        redis.call('HSET', KEYS[1], tag, '[' .. payload .. ', ' .. cjson.encode(exchange)
          .. ', ' .. cjson.encode(routing_key) .. ']')
        redis.call('ZADD', KEYS[2], ARGV[1], tag)
        redis.call('ZADD', KEYS[3], ARGV[1], tag)
      end
    end
    return {i - 3, payload}
  end
end
return nil
"""


class QoS(kombu_redis.QoS):
    """Kombu's Redis QoS for messages taken by CLAIM: it records nothing itself, removes our
    mark with Kombu's entries, hands back only what its rule says (see the module's doc), and
    leaves messages to the visibility timeout when it cannot reach the broker (to put them
    back, or to acknowledge them)."""

    def append(self, message: Any, delivery_tag: str) -> None:
        # CLAIM already recorded it on the broker, in the same step that took it.
        virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]

    def ack(self, delivery_tag: str) -> None:
        try:
            self._remove_from_indices(delivery_tag).execute()
        finally:
            # Done with it here, whatever the broker said: an acknowledgement that did not
            # reach it leaves the message held there (it comes back after the visibility
            # timeout, to a task that finds its work done), but must not keep the prefetch
            # slot for ever; Kombu's would, and a worker whose acknowledgements failed twice
            # would never take another message.
            virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        try:
            if requeue:
                self.restore_by_tag(delivery_tag, leftmost=True)  # type: ignore[no-untyped-call]
            else:
                self._remove_from_indices(delivery_tag).execute()
        finally:
            virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None) -> Any:
        pipe = super()._remove_from_indices(delivery_tag, pipe)  # type: ignore[no-untyped-call]
        return pipe.zrem(LEASED, delivery_tag)  # Kombu's pipeline adds the prefix

    def restore_unacked(self, client: Any = None) -> Any:
        held = len(self._delivered)
        try:
            return super().restore_unacked(client)  # type: ignore[no-untyped-call]
        except self.channel.connection_errors as exc:
            log.warning(
                "%d message(s) this worker held stay in the broker's unacknowledged set (%s); "
                "a worker takes them once the visibility timeout has passed",
                held,
                f"{type(exc).__name__}: {exc}",
            )
            self._delivered.clear()
            return None

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        self._vrestore_count += 1
        if (self._vrestore_count - 1) % (interval or 1):
            return
        with self.channel.conn_or_acquire() as client:
            try:
                with kombu_redis.Mutex(client, self.unacked_mutex_key, self.unacked_mutex_expire):
                    self._restore_abandoned(client, start, num)
            except kombu_redis.MutexHeld:
                pass

    def _restore_abandoned(self, client: Any, start: int, num: int | None) -> None:
        now = time()
        ours_ceiling = now - self.visibility_timeout
        foreign_ceiling = now - FOREIGN_VISIBILITY_TIMEOUT
        keys = self.channel.keys
        raw = self.channel.raw_client
        # Oldest last: as Kombu, so one scan restores at most ``num`` of them.
        visible = raw.zrange(
            keys.unacked_index,
            ours_ceiling,
            0,
            desc=True,
            byscore=True,
            offset=num and start,
            num=num,
            withscores=True,
        )
        if visible:
            tags = [tag for tag, _score in visible]
            marks = raw.zmscore(keys.leased, tags)
            for (tag, score), mark in zip(visible, marks, strict=True):
                if mark is not None or score <= foreign_ceiling:
                    self.restore_by_tag(tag, client)  # type: ignore[no-untyped-call]
        self._drop_stale_marks(now)

    def _drop_stale_marks(self, now: float) -> None:
        keys = self.channel.keys
        raw = self.channel.raw_client
        stale = raw.zrange(
            keys.leased,
            0,
            now - STALE_MARK_SECONDS,
            byscore=True,
            offset=0,
            num=100,
        )
        if not stale:
            return
        indexed = raw.zmscore(keys.unacked_index, stale)
        gone = [tag for tag, score in zip(stale, indexed, strict=True) if score is None]
        if gone:
            raw.zrem(keys.leased, *gone)

    def renew(self, tags: list[str]) -> None:
        """Mark ``tags`` as taken now, where they are still unacknowledged (ours, held by a
        live worker): neither our scan nor a plain Kombu worker's hands them back."""
        if not tags:
            return
        now = time()
        keys = self.channel.keys
        pipe = self.channel.raw_client.pipeline(transaction=False)
        # XX: only renew what is still there; an acknowledged message stays gone.
        pipe.zadd(keys.unacked_index, dict.fromkeys(tags, now), xx=True)
        pipe.zadd(keys.leased, dict.fromkeys(tags, now), xx=True)
        pipe.execute()


class _Claiming:
    """What :class:`Channel` and :class:`SentinelChannel` add to Kombu's channels."""

    QoS = QoS
    connection_class: Any = redis_connections.Connection
    connection_class_ssl: Any = redis_connections.SSLConnection

    _kept_client: Any = None
    _raw_client: Any = None
    _claim_script: Any = None
    _keys: BrokerKeys | None = None

    # From Kombu's channel (typed here for what this class uses).
    global_keyprefix: str
    priority_steps: list[int]
    unacked_key: str
    unacked_index_key: str
    brpop_timeout: float
    connection: Any
    client: Any
    qos: Any
    _closing: bool
    _queue_cycle: Any
    _in_poll: Any
    _brpop_sent_at: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._no_ack_queues: set[str] = set()
        self._fetch_queues: list[str] = []
        # Whether the last claim took a message: then there may be more, in any queue, and
        # the next peek must not wait.
        self._backlog = False
        super().__init__(*args, **kwargs)

    # -- one client per channel ---------------------------------------------------------------

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client is not None:
            yield client
            return
        self._check_open()
        pool = self.pool  # type: ignore[attr-defined]  # a new one after a reconnection
        if self._kept_client is None or self._kept_client.connection_pool is not pool:
            self._kept_client = self._create_client()  # type: ignore[attr-defined]
        yield self._kept_client

    @property
    def raw_client(self) -> Any:
        """A client on the channel's pool that prefixes nothing: for our scripts and the
        commands Kombu's prefixing client does not know, given full key names."""
        self._check_open()
        pool = self.pool  # type: ignore[attr-defined]
        if self._raw_client is None or self._raw_client.connection_pool is not pool:
            self._raw_client = redis.Redis(connection_pool=pool)
            self._claim_script = self._raw_client.register_script(CLAIM)
        return self._raw_client

    def _check_open(self) -> None:
        if self.connection is None or self.connection.client is None:
            # The error Kombu and Celery expect of a lost connection.
            raise redis_errors.ConnectionError("the channel's broker connection was closed")

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        params: dict[str, Any] = super()._connparams(asynchronous)  # type: ignore[misc]
        params["retry"] = redis_connections.reconnect_once()
        return params

    @property
    def keys(self) -> BrokerKeys:
        """This channel's key names, prefix included, as its options set them."""
        if self._keys is None:
            self._keys = BrokerKeys(
                prefix=self.global_keyprefix or "",
                priority_steps=tuple(self.priority_steps),
                unacked_name=self.unacked_key,
                unacked_index_name=self.unacked_index_key,
            )
        return self._keys

    # -- taking messages -----------------------------------------------------------------------

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._no_ack_queues.add(queue)
        else:
            self._no_ack_queues.discard(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)  # type: ignore[misc]

    def basic_get(self, queue: str, no_ack: bool = False, **_kwargs: Any) -> Any:
        claimed = self.claim([queue], record=not no_ack)
        if claimed is None:
            return None
        message = self.Message(claimed[1], channel=self)  # type: ignore[attr-defined]
        if not no_ack:
            self.qos.append(message, message.delivery_tag)
        return message

    def claim(self, queues: list[str], record: bool | None = None) -> tuple[str, Any] | None:
        """Take the next message of ``queues`` (by priority, then in order) and, for
        consumers that acknowledge (``record``, by default as each queue is consumed),
        record it as held, in one step: (queue, payload), or None when all are empty."""
        keys, flags, owners = [], [], []
        for priority in self.priority_steps:
            for queue in queues:
                keys.append(self.keys.queue(queue, priority))
                keep = record if record is not None else queue not in self._no_ack_queues
                flags.append("1" if keep else "0")
                owners.append(queue)
        raw = self.raw_client  # (re)registers the script on a new pool
        found = self._claim_script(
            keys=[self.keys.unacked, self.keys.unacked_index, self.keys.leased, *keys],
            args=[time(), *flags],
            client=raw,
        )
        if not found:
            return None
        index, payload = found
        try:
            return owners[int(index) - 1], loads(bytes_to_str(payload))  # type: ignore[no-untyped-call]
        except ValueError:
            log.error(
                "a message of queue %s is not JSON and was dropped: %.200r",
                owners[int(index) - 1],
                payload,
            )
            return None

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        claimed = self.claim([queue])
        if claimed is None:
            raise Empty()
        return claimed[1]

    def _brpop_start(self, timeout: float | None = None) -> None:
        # The consumer's blocking wait: a peek that takes nothing, at the tail of the first
        # queue the worker consumes (the shared one), not the rotation's next. A peek watches
        # one key and waits out brpop_timeout on an empty one, even while another queue has
        # messages: peeking in rotation, every other fetch of a busy shared queue would wait
        # on our own, mostly empty, queue. The claim takes from every queue, in rotation; a
        # message of ours alone waits at most brpop_timeout (1 s). While claims find
        # messages, the peek does not block (LMOVE): a backlog in any queue, the shared one
        # empty, is taken as fast as the worker finishes, not one message per timeout.
        queues = self._queue_cycle.consume(len(self.active_queues))  # type: ignore[attr-defined]
        if not queues:
            return
        self._fetch_queues = list(queues)
        consumed: list[str] = getattr(self, "_active_queues", [])
        peek = next((queue for queue in consumed if queue in queues), queues[0])
        key = self.keys.queue(peek)
        wait = self.brpop_timeout if timeout is None else timeout
        connection = self.client.connection
        self._in_poll = connection
        self._brpop_sent_at = monotonic()
        if self._backlog:
            connection.send_command("LMOVE", key, key, "RIGHT", "RIGHT")
        else:
            connection.send_command("BLMOVE", key, key, "RIGHT", "RIGHT", wait or 0)

    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                self.client.parse_response(self.client.connection, "BLMOVE", **options)
            except self.connection_errors:  # type: ignore[attr-defined]
                self.client.connection.disconnect()
                raise
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()  # type: ignore[attr-defined]
        if self._closing:
            raise Empty()  # the peek took nothing: nothing to hand back
        # Whether the peek saw a message or timed out, the claim looks at every queue and
        # priority (the peek watched only one key).
        claimed = self.claim(self._fetch_queues)
        self._backlog = claimed is not None
        if claimed is None:
            raise Empty()
        queue, payload = claimed
        self._queue_cycle.rotate(queue)
        self.connection._deliver(payload, queue)
        return True

    def _poll_error(self, type: str, **options: Any) -> Any:
        if type == "BRPOP":
            return self.client.parse_response(self.client.connection, "BLMOVE")
        return super()._poll_error(type, **options)  # type: ignore[misc]

    def renew(self, tags: list[str]) -> None:
        """Renew this worker's leases on ``tags`` (see :meth:`QoS.renew`)."""
        self.qos.renew(tags)


class Channel(_Claiming, kombu_redis.Channel):
    """A Redis channel (``redis://``, ``rediss://``) that claims atomically."""


class SentinelChannel(_Claiming, kombu_redis.SentinelChannel):
    """A Sentinel-managed Redis channel (``sentinel://``) that claims atomically. Its
    connections ask the sentinels for the primary and reconnect on ``READONLY``."""

    connection_class = kombu_redis.SentinelChannel.connection_class
    connection_class_ssl = kombu_redis.SentinelChannel.connection_class_ssl


class Transport(kombu_redis.Transport):
    """Kombu's Redis transport with :class:`Channel`."""

    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    """Kombu's Sentinel transport with :class:`SentinelChannel`."""

    Channel = SentinelChannel


class _PatientStore:
    """Stores a task's state again while Redis cannot be reached (a Sentinel failover leaves
    no primary for a few seconds), for up to RESULT_STORE_PATIENCE_SECONDS, then gives it up
    with one warning line. Celery would fail the task instead, with a traceback, though its
    work is done (an import is committed before its state is stored)."""

    connection_errors: tuple[type[BaseException], ...]

    def store_result(self, task_id: str, result: Any, state: str, *args: Any, **kwargs: Any) -> Any:
        deadline = monotonic() + RESULT_STORE_PATIENCE_SECONDS
        pause = RESULT_STORE_FIRST_PAUSE
        while True:
            try:
                return super().store_result(task_id, result, state, *args, **kwargs)  # type: ignore[misc]
            except self.connection_errors as exc:
                if monotonic() + pause > deadline:
                    log.warning(
                        "task %s: its state (%s) is not stored, Redis stayed unreachable for "
                        "%.0f s (%s); what the task did stands",
                        task_id,
                        state,
                        RESULT_STORE_PATIENCE_SECONDS,
                        type(exc).__name__,
                    )
                    return result
                sleep(pause)
                pause = min(2 * pause, RESULT_STORE_LONGEST_PAUSE)


class ResultBackend(_PatientStore, RedisBackend):  # type: ignore[misc]
    """Celery's Redis result backend, reconnecting on ``READONLY``, with keepalives."""

    def _create_client(self, **params: Any) -> Any:
        tls = issubclass(params.get("connection_class", redis.Connection), redis.SSLConnection)
        params["connection_class"] = (
            redis_connections.SSLConnection if tls else redis_connections.Connection
        )
        return super()._create_client(**_bounded(params))


class SentinelResultBackend(_PatientStore, SentinelBackend):  # type: ignore[misc]
    """Celery's Sentinel result backend (its connections ask the sentinels again after a
    failover or on ``READONLY``), with keepalives."""

    def _create_client(self, **params: Any) -> Any:
        return super()._create_client(**_bounded(params))


def _bounded(params: dict[str, Any]) -> dict[str, Any]:
    """Celery's backend connection arguments with ours (keepalives, the retry)."""
    return {
        **params,
        "socket_keepalive_options": redis_connections.KEEPALIVE_OPTIONS,
        "retry": redis_connections.reconnect_once(),
    }


def install() -> None:
    """Make every Redis URL use the classes here in this process. Kombu and Celery map a URL's
    scheme to their class in TRANSPORT_ALIASES and BACKEND_ALIASES: registering there (rather
    than naming a class in the configuration) keeps "Connected to redis://..." in the logs that
    operators grep."""
    for scheme in ("redis", "rediss"):
        TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
        celery_backends.BACKEND_ALIASES[scheme] = f"{__name__}:ResultBackend"
    TRANSPORT_ALIASES["sentinel"] = f"{__name__}:SentinelTransport"
    celery_backends.BACKEND_ALIASES["sentinel"] = f"{__name__}:SentinelResultBackend"
