"""A TCP proxy of the test's own, between the roles and a server, that breaks the path the
ways production networks do, on command:

- ``freeze()``: stop forwarding, in both directions, on every connection, old and new, without
  closing anything (no FIN, no RST): a middlebox that went silent, a partition. ``resume()``
  forwards what waited and goes on.
- ``retarget(port)``: send new connections to another server while the open ones stay where
  they are: a managed Redis endpoint after a switch-over.
- ``cut_replies(commands, every)``: for Redis, drop one in ``every`` non-empty replies (drawn
  at random, seeded) to one of ``commands`` (names, or ``EVALSHA <sha>`` for one script) and reset both sides of its
  connection instead of delivering it: the server did the command, the client never hears
  of it. Only connections made after the call are followed.

It runs an asyncio loop in a thread of the test process.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

from ibutsu_testing.services import free_port

CHUNK = 65536


class _Resp:
    """Splits a stream of RESP values (RESP2, and RESP3, which redis-py speaks) into whole
    values, as bytes come."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, object, bool]]:
        """Whole values now available: (their bytes, the value, whether it is a push). A
        value is a list for an aggregate, None for a null, else the bytes of its line."""
        self.buffer += data
        values: list[tuple[bytes, object, bool]] = []
        while self.buffer:
            parsed = _value(self.buffer, 0)
            if parsed is None:
                break
            end, value = parsed
            values.append((bytes(self.buffer[:end]), value, self.buffer[:1] == b">"))
            del self.buffer[:end]
        return values


# RESP types by their first byte: one line, a length then the bytes, or a count of values.
_LINES = b"+-:_#,("
_LENGTHS = b"$=!"
_COUNTS = {b"*": 1, b"~": 1, b">": 1, b"%": 2, b"|": 2}


def _value(buffer: bytearray, start: int) -> tuple[int, object] | None:
    """(end, value) of the RESP value at ``start``, or None if it is not all there yet."""
    line_end = buffer.find(b"\r\n", start)
    if line_end < 0:
        return None
    kind, head = bytes(buffer[start : start + 1]), bytes(buffer[start + 1 : line_end])
    after = line_end + 2
    if kind in (b"_",):
        return after, None
    if kind in _LINES:
        return after, head
    if kind in _LENGTHS:
        return _bulk(buffer, after, int(head))
    if kind in _COUNTS:
        items = _array(buffer, after, int(head) * _COUNTS[kind])
        if kind == b"|" and items is not None:  # an attribute: the value follows it
            return _value(buffer, items[0])
        return items
    raise ValueError(f"not RESP: {bytes(buffer[start : start + 20])!r}")


def _bulk(buffer: bytearray, start: int, length: int) -> tuple[int, object] | None:
    if length < 0:
        return start, None
    if len(buffer) < start + length + 2:
        return None
    return start + length + 2, bytes(buffer[start : start + length])


def _array(buffer: bytearray, start: int, count: int) -> tuple[int, object] | None:
    if count < 0:
        return start, None
    items = []
    for _ in range(count):
        parsed = _value(buffer, start)
        if parsed is None:
            return None
        start, item = parsed
        items.append(item)
    return start, items


@dataclass
class _Cut:
    commands: frozenset[bytes]
    every: int
    # Which replies are cut is drawn (seeded: the same run cuts the same), not counted: a
    # count would fall into step with the client's own pattern of commands and retries.
    draw: random.Random = field(default_factory=lambda: random.Random(17))
    done: Counter[str] = field(default_factory=Counter)


@dataclass
class TcpProxy:
    """See the module's doc. ``port`` is where clients connect."""

    target_port: int
    port: int = field(default_factory=free_port)
    connections: int = 0

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._flowing: asyncio.Event | None = None
        self._cut: _Cut | None = None
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    # -- control, from the test's thread ---------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)

    def stop(self) -> None:
        """Close every connection (with a reset) and stop listening: the server is gone."""
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def freeze(self) -> None:
        self._call(lambda: self._flow().clear())

    def resume(self) -> None:
        self._call(lambda: self._flow().set())

    def retarget(self, port: int) -> None:
        self._call(lambda: setattr(self, "target_port", port))

    def cut_replies(self, commands: tuple[str, ...], every: int) -> None:
        cut = _Cut(frozenset(c.upper().encode() for c in commands), every)
        self._call(lambda: setattr(self, "_cut", cut))

    @property
    def cuts(self) -> Counter[str]:
        """How many replies were cut, by command (as given to ``cut_replies``)."""
        return Counter(self._cut.done) if self._cut is not None else Counter()

    def _call(self, action: object) -> None:
        async def run() -> None:
            action()  # type: ignore[operator]

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    # -- the loop ---------------------------------------------------------------------------

    def _flow(self) -> asyncio.Event:
        if self._flowing is None:
            self._flowing = asyncio.Event()
            self._flowing.set()
        return self._flowing

    async def _listen(self) -> None:
        self._flow()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        link = _Link(self._cut)  # a connection is watched if cutting was asked before it came
        await self._flow().wait()  # a frozen path accepts, then says nothing
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        ends = (writer, up_writer)
        self._writers.update(ends)
        with suppress(asyncio.CancelledError):  # stopped: nothing to report
            await asyncio.gather(
                self._pump(reader, up_writer, ends, link.commands),
                self._pump(up_reader, writer, ends, link.replies),
            )

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        ends: tuple[asyncio.StreamWriter, ...],
        inspect: Callable[[bytes], tuple[bytes, bool]],
    ) -> None:
        try:
            while True:
                await self._flow().wait()
                data = await source.read(CHUNK)
                if not data:
                    break
                await self._flow().wait()  # frozen meanwhile: hold what was read
                forward, cut = inspect(data)
                if forward:
                    sink.write(forward)
                    await sink.drain()
                if cut:
                    for end in ends:
                        end.transport.abort()
                    return
        except OSError:
            pass
        finally:
            with suppress(Exception):
                sink.close()
            self._writers.discard(sink)


class _Link:
    """One client connection's Redis conversation, as far as cutting replies needs it."""

    def __init__(self, cut: _Cut | None) -> None:
        self.cut = cut
        self.sent: deque[bytes] = deque()  # names of the commands waiting for their reply
        self.requests = _Resp()
        self.answers = _Resp()

    def commands(self, data: bytes) -> tuple[bytes, bool]:
        if self.cut is not None:
            for _raw, value, _push in self.requests.feed(data):
                name = _command(value)
                if name in (b"SUBSCRIBE", b"PSUBSCRIBE"):
                    self.cut = None  # pushes come unasked from now on: not followed
                self.sent.append(name)
        return data, False

    def replies(self, data: bytes) -> tuple[bytes, bool]:
        cut = self.cut
        if cut is None:
            return data, False
        forward = bytearray()
        for raw, value, push in self.answers.feed(data):
            name = b"" if push or not self.sent else self.sent.popleft()
            if name in cut.commands and value is not None and cut.draw.random() * cut.every < 1:
                cut.done[name.decode()] += 1
                return bytes(forward), True
            forward += raw
        return bytes(forward), False


def _command(value: object) -> bytes:
    """A request's name, upper case; for EVALSHA, with the script's SHA-1 (``EVALSHA <sha>``)."""
    if not isinstance(value, list) or not value or not isinstance(value[0], bytes):
        return b""
    name = value[0].upper()
    if name == b"EVALSHA" and len(value) > 1 and isinstance(value[1], bytes):
        return name + b" " + value[1].upper()
    return name


@contextmanager
def tcp_proxy(target_port: int) -> Iterator[TcpProxy]:
    """A running :class:`TcpProxy` to 127.0.0.1:``target_port``."""
    proxy = TcpProxy(target_port)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
