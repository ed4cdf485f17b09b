"""One media stream's WebSocket, read and written as Twilio protocol messages.

The aiohttp side of :mod:`gateway.twilio.protocol`: :class:`MediaStream` turns an accepted
``web.WebSocketResponse`` into parsed, validated messages and raises
:class:`~gateway.twilio.protocol.StreamProtocolError` (with the close code to use) for
anything wrong on the socket: bad input, a WebSocket-level error, no ``start`` in time, a
stream that goes quiet, caller audio faster than real time, or a caller that stops reading
what it is sent. What to do with the error (log, count, close) is the server's.

Both ways are bounded. Caller audio may run ahead of the clock by ``audio_burst_s`` at most
(:class:`RealTimePace`; Twilio sends it in real time). What is sent to the caller never
waits on the socket: it is written at once while the socket keeps up, and otherwise queued,
in order, for a writer task; once more than ``send_buffer_s`` of audio is queued (beyond the
socket's own buffers, which hold about as much again) the caller is a slow consumer and the
connection is cut.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import AsyncGenerator

from aiohttp import WSMsgType, web

from gateway.twilio.protocol import (
    CLOSE_INVALID_DATA,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_POLICY_VIOLATION,
    CLOSE_PROTOCOL_ERROR,
    InboundMessage,
    Media,
    Start,
    StreamParser,
    StreamProtocolError,
)

__all__ = [
    "SLOW_CONSUMER",
    "TOO_FAST",
    "WRITER_LIMIT",
    "IdleWatch",
    "MediaStream",
    "Outbox",
    "RealTimePace",
]

#: Longest close reason sent: a close frame's payload is 125 bytes, 2 of them the code.
_MAX_REASON_BYTES = 120
#: Twilio's audio: 8 kHz mu-law, a byte a sample; base64 in a text frame, 4 chars per 3.
_ULAW_BYTES_PER_S = 8000
_TEXT_BYTES_PER_AUDIO_S = _ULAW_BYTES_PER_S * 4 / 3
#: The WebSocket writer checks the transport's buffer every WRITER_LIMIT bytes written.
WRITER_LIMIT = 4 * 1024

TOO_FAST = "caller audio faster than real time"
SLOW_CONSUMER = "slow consumer: caller not reading"


class RealTimePace:
    """Caller audio may arrive ``rate`` times faster than real time, ``burst_s`` ahead at most.

    The clock starts at the first frame. Twilio sends 20 ms every 20 ms; a stall on the way
    arrives as a burst that only catches up, so only a peer sending faster than it speaks runs
    ahead (a flood delivered hours of "audio" to the model in a minute, at our cost).
    """

    __slots__ = ("_audio_s", "_burst_s", "_rate", "_t0")

    def __init__(self, rate: float = 1.0, burst_s: float = 2.0) -> None:
        self._rate = rate
        self._burst_s = burst_s
        self._t0: float | None = None
        self._audio_s = 0.0

    def admit(self, ulaw_bytes: int, now: float) -> bool:
        """Count a frame received at ``now``; False once the audio is too far ahead."""
        if self._t0 is None:
            self._t0 = now
        self._audio_s += ulaw_bytes / _ULAW_BYTES_PER_S
        return self._audio_s <= (now - self._t0) * self._rate + self._burst_s


class IdleWatch:
    """Interrupts a wait on a stream that sends nothing for ``limit`` seconds.

    One timer per stream, re-armed when it fires, instead of ``receive(timeout=...)``, which
    arms and cancels a timer for every 20 ms frame (~6% of the gateway's CPU). As with a
    timeout, the budget starts when the wait does and the waiting task is cancelled; the
    timer stops once the socket is closed.
    """

    def __init__(self, ws: web.WebSocketResponse, limit: float) -> None:
        self.loop = asyncio.get_running_loop()
        self._ws = ws
        self._limit = limit
        self.since = self.loop.time()
        self.waiter: asyncio.Task[object] | None = None
        self.fired = False
        self.loop.call_at(self.since + limit, self._check)

    def _check(self) -> None:
        if self._ws.closed:
            return
        now = self.loop.time()
        if self.waiter is not None and now >= self.since + self._limit:
            self.fired = True
            self.waiter.cancel()
            return
        due = self.since + self._limit if self.waiter is not None else now + self._limit
        self.loop.call_at(due, self._check)


class Outbox:
    """What goes to the caller, without ever waiting on the socket.

    Written at once while the transport has room; otherwise queued, in order, for a writer
    task. More than ``send_buffer_s`` of audio queued makes the caller a slow consumer: the
    queue is dropped and the connection cut (:attr:`slow`).
    """

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport | None,
        send_buffer_s: float,
    ) -> None:
        self._ws = ws
        self._transport = transport
        self._limit = send_buffer_s * _TEXT_BYTES_PER_AUDIO_S
        # The socket's own buffers hold about as much again: the transport's half of it, the
        # kernel's (which Linux doubles) the other half.
        self._high_water = int(self._limit / 2)
        if transport is not None:
            _small_send_buffers(transport, self._high_water)
        self._queue: deque[str] = deque()
        self._queued_bytes = 0
        self.peak_queued_bytes = 0  # the most ever queued
        self._writer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._writing = False
        self.slow = False  # cut as a slow consumer

    @property
    def closed(self) -> bool:
        return self._ws.closed or self.slow

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    async def send(self, text: str) -> None:
        """Send one text frame (see :meth:`MediaStream.send`)."""
        if self.closed:
            return
        size = len(text) + 8  # the frame's header, at most
        transport = self._transport
        if (
            not self._queue
            and not self._writing
            and (transport is None or transport.get_write_buffer_size() + size <= self._high_water)
        ):
            try:
                await self._ws.send_str(text)
            except ConnectionResetError:
                pass
            return
        self._queue.append(text)
        self._queued_bytes += size
        if self._queued_bytes > self.peak_queued_bytes:
            self.peak_queued_bytes = self._queued_bytes
        if self._queued_bytes > self._limit:
            self._cut_slow_consumer()
        elif self._writer is None:
            self._writer = asyncio.create_task(self._write(), name="to-caller")
        else:
            self._wake.set()

    async def _write(self) -> None:
        """Write what is queued, in order, waiting on the socket as long as it takes."""
        ws, queue = self._ws, self._queue
        while not self.closed:
            while queue:
                text = queue[0]
                self._writing = True
                try:
                    await ws.send_str(text)
                except ConnectionResetError:
                    queue.clear()
                    self._queued_bytes = 0
                    return
                finally:
                    self._writing = False
                queue.popleft()
                self._queued_bytes -= len(text) + 8
            self._wake.clear()
            await self._wake.wait()

    def _cut_slow_consumer(self) -> None:
        """The caller stopped reading: drop what waits and cut the connection at once (a
        close frame would wait behind the backlog); the reading side sees it end."""
        self.slow = True
        self._queue.clear()
        self._queued_bytes = 0
        if self._transport is not None:
            self._transport.abort()
        self._wake.set()

    async def aclose(self) -> None:
        """Stop the writer task."""
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
            self._writer = None


class MediaStream:
    """A Twilio media stream on an accepted WebSocket.

    ``messages`` yields every message in order until the socket closes; it is one generator
    for the stream's life, so the wait for ``start`` and the call read the same sequence.
    What goes the other way is the :class:`Outbox`'s.
    """

    def __init__(
        self,
        ws: web.WebSocketResponse,
        idle_timeout_s: float,
        *,
        transport: asyncio.Transport | None = None,
        audio_rate: float = 1.0,
        audio_burst_s: float = 2.0,
        send_buffer_s: float = 2.0,
    ) -> None:
        self._ws = ws
        self._idle_timeout_s = idle_timeout_s
        self._pace = RealTimePace(audio_rate, audio_burst_s)
        self._out = Outbox(ws, transport, send_buffer_s)
        self._start_waiter: asyncio.Task[object] | None = None
        self._evicted = ""
        self.messages: AsyncGenerator[InboundMessage] = self._read()

    @property
    def closed(self) -> bool:
        return self._out.closed

    @property
    def slow(self) -> bool:
        """Cut as a slow consumer."""
        return self._out.slow

    @property
    def queued(self) -> int:
        """Messages waiting for the caller's socket."""
        return self._out.queued

    @property
    def queued_audio_s(self) -> float:
        """About how much audio waits for the caller's socket (frames counted whole)."""
        return self._out.queued_bytes / _TEXT_BYTES_PER_AUDIO_S

    @property
    def peak_queued_audio_s(self) -> float:
        """The most audio that ever waited for the caller's socket."""
        return self._out.peak_queued_bytes / _TEXT_BYTES_PER_AUDIO_S

    async def wait_start(self, timeout_s: float) -> Start | None:
        """The stream's ``start``, or None if the socket closed before it."""
        self._start_waiter = task = asyncio.current_task()
        try:
            async with asyncio.timeout(timeout_s):
                async for message in self.messages:
                    if isinstance(message, Start):
                        return message
        except TimeoutError:
            raise StreamProtocolError(
                CLOSE_POLICY_VIOLATION, "no start before the deadline"
            ) from None
        except asyncio.CancelledError:
            if self._evicted and task is not None and task.uncancel() == 0:
                raise StreamProtocolError(CLOSE_POLICY_VIOLATION, self._evicted) from None
            raise
        finally:
            self._start_waiter = None
        return None

    def evict(self, reason: str) -> None:
        """End the wait for ``start`` now: :meth:`wait_start` raises with ``reason``."""
        if self._start_waiter is not None and not self._evicted:
            self._evicted = reason
            self._start_waiter.cancel()

    async def send(self, text: str) -> None:
        """Send one text frame to the caller without ever waiting on the socket.

        Written at once while the transport has room for it (the write cannot block then);
        otherwise queued behind what waits already, for the writer task. A caller that lets
        more than ``send_buffer_s`` of audio pile up is cut (:attr:`slow`); its reading side
        then ends the call with :data:`SLOW_CONSUMER`. Nothing is sent once the caller is
        gone: the reading side ends the call then too.
        """
        await self._out.send(text)

    async def close(self, code: int, reason: str) -> None:
        if self._out.slow:
            return  # cut already; nothing can reach the caller
        await self._ws.close(code=code, message=reason.encode()[:_MAX_REASON_BYTES])

    async def aclose(self) -> None:
        """Stop reading (the generator's ``finally``) and writing; the socket is the
        server's to close."""
        await self.messages.aclose()
        await self._out.aclose()

    async def _read(self) -> AsyncGenerator[InboundMessage]:
        parser = StreamParser()
        ws = self._ws
        out = self._out
        idle = IdleWatch(ws, self._idle_timeout_s)
        admit = self._pace.admit
        clock = idle.loop.time
        while True:
            task = asyncio.current_task()
            idle.since, idle.waiter = idle.loop.time(), task
            try:
                msg = await ws.receive()
            except asyncio.CancelledError:
                if idle.fired and task is not None and task.uncancel() == 0:
                    raise StreamProtocolError(
                        CLOSE_POLICY_VIOLATION, "stream idle too long"
                    ) from None
                raise
            finally:
                idle.waiter = None
            if msg.type is WSMsgType.TEXT:
                message = parser.parse(msg.data)
                if type(message) is Media and not admit(len(message.payload), clock()):
                    raise StreamProtocolError(CLOSE_POLICY_VIOLATION, TOO_FAST)
                yield message
            elif out.slow:
                raise StreamProtocolError(CLOSE_POLICY_VIOLATION, SLOW_CONSUMER)
            elif msg.type is WSMsgType.BINARY:
                parser.parse_bytes(msg.data)
            elif msg.type is WSMsgType.ERROR:
                raise _socket_error(msg.data)
            else:  # CLOSE, CLOSING, CLOSED
                return


def _small_send_buffers(transport: asyncio.Transport, size: int) -> None:
    """Keep what the kernel and the transport buffer toward the caller to ``size`` bytes
    each, so a caller that stops reading is noticed in seconds of audio, not minutes (Linux
    grows a socket's send buffer to megabytes by itself)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        except OSError:
            pass
    transport.set_write_buffer_limits(high=size)


def _socket_error(error: object) -> StreamProtocolError:
    """aiohttp has already closed the socket with the error's code (1009, 1007, 1002)."""
    code = getattr(error, "code", None)
    if code == CLOSE_MESSAGE_TOO_BIG:
        return StreamProtocolError(CLOSE_MESSAGE_TOO_BIG, "message too big")
    if code == CLOSE_INVALID_DATA:
        return StreamProtocolError(CLOSE_INVALID_DATA, "invalid UTF-8 text")
    return StreamProtocolError(int(code or CLOSE_PROTOCOL_ERROR), "websocket protocol error")
