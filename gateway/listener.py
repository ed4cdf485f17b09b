"""What any peer may hold on the gateway's listening socket, and what it may make us log.

The gateway's URL is public: anyone can open sockets, send half a request and wait, or send
bytes that are not HTTP. The bounds here apply before any signature is checked:

- **Deadlines** (:class:`ConnectionDeadlines`). A new connection must finish its first
  request head within ``header_timeout_s``; a kept-alive connection that sends nothing more
  for ``keepalive_s`` is closed. A connection inside a request (a webhook, a media stream)
  is its handler's business: the body deadline and the stream's own deadlines bound those.
- **Open files** (:func:`raise_open_file_limit`). Each socket is a file descriptor; the
  soft limit (often 1024) is raised to the hard limit at start, and logged.
- **Logs** (:class:`Throttle`). What a peer can trigger at will (aiohttp's errors about a
  connection, the event loop's accept errors when descriptors run out, deadlines expiring)
  is counted in metrics and logged at WARNING: a few lines as they come, then one line per
  interval with the count, never a line or a traceback per event.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import Counter as MetricCounter

__all__ = [
    "ACCEPT_ERROR",
    "ConnectionDeadlines",
    "PeerErrorLog",
    "Throttle",
    "open_file_limit",
    "raise_open_file_limit",
    "watch_accept_errors",
]

#: The event loop's context message when accept() fails for lack of descriptors or memory.
ACCEPT_ERROR = "socket.accept() out of system resource"


class Throttle:
    """Log one kind of peer-triggered event without letting a flood through.

    The first ``burst`` events of an interval are logged as they come; the rest are counted
    and summed up in one WARNING at the interval's end, with the count by reason. Called on
    the event loop only.
    """

    def __init__(
        self, logger: logging.Logger, what: str, interval_s: float, burst: int = 1
    ) -> None:
        if not interval_s > 0:
            raise ValueError("interval_s must be positive")
        self._log = logger
        self._what = what
        self._interval = interval_s
        self._burst = burst
        self._logged = 0  # lines logged in the current interval
        self._held: Counter[str] = Counter()  # counted, not logged, by reason
        self._timer: asyncio.TimerHandle | None = None

    @property
    def held(self) -> int:
        """Events counted but not yet summed up (for tests)."""
        return sum(self._held.values())

    def note(self, reason: str, message: str, *args: object, **extra: Any) -> None:
        """One event: ``message % args`` logged, or counted under ``reason``."""
        if self._logged < self._burst:
            self._logged += 1
            self._log.warning(message, *args, extra=extra or None)
        else:
            self._held[reason] += 1
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._interval, self._flush)

    def _flush(self) -> None:
        self._timer = None
        self._logged = 0
        if not self._held:
            return
        held, self._held = self._held, Counter()
        counts = ", ".join(f"{reason} {n}" for reason, n in held.most_common())
        self._log.warning(
            "%s: %d more in the last %g s (%s)",
            self._what,
            sum(held.values()),
            self._interval,
            counts,
        )
        # A flood that goes on gets its next summary an interval later.
        self._timer = asyncio.get_running_loop().call_later(self._interval, self._flush)

    def close(self) -> None:
        """Sum up what is held now, and stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._held:
            self._flush()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None


#: Errors a peer causes (the bytes it sent, or its going away), as opposed to our own bugs.
_PEER_ERRORS: tuple[type[BaseException], ...] = (
    HttpProcessingError,
    ConnectionError,
    web.RequestPayloadError,
    asyncio.TimeoutError,
)


class PeerErrorLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server logger (its request handler's ``logger``), with peers throttled.

    aiohttp logs every malformed request (a bad request line, an oversized header, a body
    cut off) at ERROR with a traceback. Those are a peer's doing: counted by kind and logged
    through a :class:`Throttle`, without traceback (what aiohttp logs at DEBUG, such as TLS
    or other non-HTTP bytes as a first request, is counted and stays at DEBUG). Anything
    else it logs at ERROR (an exception from our own handler) stays an ERROR with its
    traceback.
    """

    def __init__(self, throttle: Throttle, counter: MetricCounter) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self._throttle = throttle
        self._counter = counter

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        error = _logged_error(kwargs.get("exc_info"))
        if isinstance(error, _PEER_ERRORS):
            kind = type(error).__name__
            self._counter.labels(reason=kind).inc()
            if level >= logging.WARNING:
                self._throttle.note(kind, "bad request from a peer: %s", kind)
                return
        super().log(level, msg, *args, **kwargs)

    def process(
        self, msg: object, kwargs: MutableMapping[str, Any]
    ) -> tuple[object, MutableMapping[str, Any]]:
        return msg, kwargs


def _logged_error(exc_info: object) -> BaseException | None:
    """The exception a logging call's ``exc_info`` names (True: the one being handled)."""
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple) and len(exc_info) == 3:
        value = exc_info[1]
        return value if isinstance(value, BaseException) else None
    if exc_info:
        return sys.exc_info()[1]
    return None


def watch_accept_errors(
    loop: asyncio.AbstractEventLoop, throttle: Throttle, counter: MetricCounter
) -> Callable[[], None]:
    """Route the event loop's accept errors (out of descriptors) to ``throttle``.

    asyncio reports each failed ``accept()`` to the loop's exception handler, which logs it
    at ERROR: tens of thousands of lines a minute while descriptors run out. Everything else
    goes to the handler there was before. Returns the function that puts that one back.
    """
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == ACCEPT_ERROR:
            exc = context.get("exception")
            code = getattr(exc, "errno", None)
            name = errno.errorcode.get(code, "error") if isinstance(code, int) else "error"
            counter.labels(reason=name).inc()
            throttle.note(name, "cannot accept connections: %s (%s)", name, _strerror(exc))
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)

    def restore() -> None:
        loop.set_exception_handler(previous)

    return restore


def _strerror(exc: object) -> str:
    text = getattr(exc, "strerror", None)
    return text if isinstance(text, str) else type(exc).__name__


# --------------------------------------------------------------------- deadlines


class ConnectionDeadlines:
    """Closes connections that hold a socket without a request in progress too long.

    aiohttp (from 3.14 on) applies its keep-alive timeout from the moment a connection opens,
    but earlier versions wait forever for a first request, and every version gives a request
    head as long as the keep-alive to arrive. This sweep holds both deadlines on any version,
    with only public aiohttp API: the server's connection list, ``force_close()``, and a
    middleware that marks connections inside a request. A connection is first seen at a
    sweep, so a deadline holds to within one sweep (a quarter of the header deadline, at
    most a second).
    """

    def __init__(
        self,
        header_timeout_s: float,
        keepalive_s: float,
        on_close: Callable[[str], None],
    ) -> None:
        self._header = header_timeout_s
        self._keepalive = keepalive_s
        self._on_close = on_close
        self._tick = min(1.0, max(0.02, min(header_timeout_s, keepalive_s) / 4))
        self._busy: Counter[web.RequestHandler] = Counter()
        self._idle_since: dict[web.RequestHandler, float] = {}  # after a request ended
        self._first_seen: dict[web.RequestHandler, float] = {}
        self._server: web.Server | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.open = 0  # connections at the last sweep

    @web.middleware
    async def middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        protocol = request.protocol
        self._busy[protocol] += 1
        try:
            return await handler(request)
        finally:
            self._busy[protocol] -= 1
            if not self._busy[protocol]:
                del self._busy[protocol]
            self._idle_since[protocol] = asyncio.get_running_loop().time()

    def watch(self, server: web.Server) -> None:
        """Sweep the connections of ``server`` (a runner's) until :meth:`stop`."""
        self._server = server
        self._timer = asyncio.get_running_loop().call_later(self._tick, self._sweep)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._server = None

    def _sweep(self) -> None:
        server = self._server
        if server is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        connections = server.connections
        first_seen = {c: self._first_seen.get(c, now) for c in connections}
        idle_since = {c: t for c, t in self._idle_since.items() if c in first_seen}
        self._first_seen, self._idle_since = first_seen, idle_since
        self.open = len(connections)
        for connection in connections:
            if connection in self._busy:
                continue
            ended = idle_since.get(connection)
            if ended is None:
                expired, reason = now - first_seen[connection] >= self._header, "no_request"
            else:
                expired, reason = now - ended >= self._keepalive, "idle"
            if expired:
                connection.force_close()
                self._on_close(reason)
        self._timer = loop.call_later(self._tick, self._sweep)


# -------------------------------------------------------------------- open files


def open_file_limit() -> tuple[int, int]:
    """The process's (soft, hard) limit on open files; ``resource.RLIM_INFINITY`` is -1."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def raise_open_file_limit() -> tuple[int, int, int]:
    """Raise the soft open-file limit to the hard one: ``(before, now, hard)``.

    Every socket (a caller's stream, its Live connection, each idle or probing client) is a
    descriptor; a soft limit of 1024 is a few hundred calls, or one idle-socket script. An
    unlimited hard limit is capped at what Linux allows a process by default (``nr_open``).
    """
    soft, hard = open_file_limit()
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as nr_open:
                target = int(nr_open.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            pass
    now, hard = open_file_limit()
    return soft, now, hard
