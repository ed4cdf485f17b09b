"""One media stream's WebSocket, read and written as Twilio protocol messages.

The aiohttp side of :mod:`gateway.twilio.protocol`: :class:`MediaStream` turns an accepted
``web.WebSocketResponse`` into parsed, validated messages and raises
:class:`~gateway.twilio.protocol.StreamProtocolError` (with the close code to use) for
anything wrong on the socket: bad input, a WebSocket-level error, no ``start`` in time, or a
stream that goes quiet. What to do with the error (log, count, close) is the server's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from aiohttp import WSMsgType, web

from gateway.twilio.protocol import (
    CLOSE_INVALID_DATA,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_POLICY_VIOLATION,
    CLOSE_PROTOCOL_ERROR,
    InboundMessage,
    Start,
    StreamParser,
    StreamProtocolError,
)

__all__ = ["IdleWatch", "MediaStream"]

#: Longest close reason sent: a close frame's payload is 125 bytes, 2 of them the code.
_MAX_REASON_BYTES = 120


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


class MediaStream:
    """A Twilio media stream on an accepted WebSocket.

    ``messages`` yields every message in order until the socket closes; it is one generator
    for the stream's life, so the wait for ``start`` and the call read the same sequence.
    """

    def __init__(self, ws: web.WebSocketResponse, idle_timeout_s: float) -> None:
        self._ws = ws
        self._idle_timeout_s = idle_timeout_s
        self.messages: AsyncGenerator[InboundMessage] = self._read()

    @property
    def closed(self) -> bool:
        return self._ws.closed

    async def wait_start(self, timeout_s: float) -> Start | None:
        """The stream's ``start``, or None if the socket closed before it."""
        try:
            async with asyncio.timeout(timeout_s):
                async for message in self.messages:
                    if isinstance(message, Start):
                        return message
        except TimeoutError:
            raise StreamProtocolError(
                CLOSE_POLICY_VIOLATION, "no start before the deadline"
            ) from None
        return None

    async def send(self, text: str) -> None:
        """Write one text frame; nothing if the caller is gone (the reading side ends the
        call then)."""
        if self._ws.closed:
            return
        try:
            await self._ws.send_str(text)
        except ConnectionResetError:
            pass

    async def close(self, code: int, reason: str) -> None:
        await self._ws.close(code=code, message=reason.encode()[:_MAX_REASON_BYTES])

    async def aclose(self) -> None:
        """Stop reading (the generator's ``finally``); the socket is the server's to close."""
        await self.messages.aclose()

    async def _read(self) -> AsyncGenerator[InboundMessage]:
        parser = StreamParser()
        ws = self._ws
        idle = IdleWatch(ws, self._idle_timeout_s)
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
                yield parser.parse(msg.data)
            elif msg.type is WSMsgType.BINARY:
                parser.parse_bytes(msg.data)
            elif msg.type is WSMsgType.ERROR:
                raise _socket_error(msg.data)
            else:  # CLOSE, CLOSING, CLOSED
                return


def _socket_error(error: object) -> StreamProtocolError:
    """aiohttp has already closed the socket with the error's code (1009, 1007, 1002)."""
    code = getattr(error, "code", None)
    if code == CLOSE_MESSAGE_TOO_BIG:
        return StreamProtocolError(CLOSE_MESSAGE_TOO_BIG, "message too big")
    if code == CLOSE_INVALID_DATA:
        return StreamProtocolError(CLOSE_INVALID_DATA, "invalid UTF-8 text")
    return StreamProtocolError(int(code or CLOSE_PROTOCOL_ERROR), "websocket protocol error")
