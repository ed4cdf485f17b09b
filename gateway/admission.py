"""Which calls and media streams the gateway takes on: one count of capacity for the voice
webhook and the stream, and the streams waiting for their ``start``.

**Capacity.** ``MAX_CALLS`` slots. A call holds one from the voice webhook that answers it with
``<Connect><Stream>`` (a *reservation*) until its stream ends: the webhook answers busy once the
calls in progress and the reservations fill ``MAX_CALLS``, and a stream whose ``start`` names a
reserved call always becomes that call, however many other streams started meanwhile. A
reservation ends when its stream starts, when Twilio reports the call over, or when its stream
token expires (``STREAM_TOKEN_TTL_S``: no stream can start the call after that). A stream with
no reservation here (its webhook went to another replica, or its reservation expired) becomes a
call while a slot is neither in use nor reserved.

**Streams waiting for ``start``.** The upgrade is signed alike for every call (Twilio signs the
stream URL, which carries nothing of the call), so anyone who saw one can open streams that
never start; the ``start``, with the call's single-use token, is the first thing only Twilio
can send. Twilio sends it right after the upgrade, and calls answered together (a campaign, a
busy minute, a replica taking over) open their streams together: a burst is many streams whose
``start`` is already on the wire, late only by how long the gateway's event loop takes to read
it. So:

- every signed upgrade is taken while a call could still start (fewer than ``MAX_CALLS`` calls
  in progress), however many come at once;
- each must start within ``START_TIMEOUT_S`` (the server's deadline);
- once more streams wait than could become calls (``MAX_CALLS`` less the calls in progress),
  each new upgrade closes the oldest waiting streams that have been quiet for at least
  ``grace_s``: longer than the loop is late to read a ``start`` in a burst
  (``gateway_stream_start_wait_seconds`` measures it), so a burst's streams are never closed,
  and one who holds streams open without starting them holds each for ``grace_s`` once the
  pool is full, not until the deadline.

No per-peer limit: Twilio's streams come from a few of its addresses (and, behind a proxy,
all from the proxy's), so a limit per address would refuse exactly a burst.

Pure bookkeeping: the server says what happens (a webhook, an upgrade, a ``start``, a call's
end) and how many calls are in progress; no I/O, no task.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["START_GRACE_S", "Admission"]

S = TypeVar("S", bound=Hashable)

#: How long a waiting stream is safe from closing to make room (capped by START_TIMEOUT_S).
START_GRACE_S = 1.0


class Admission(Generic[S]):
    """Reservations (CallSid -> expiry) and the streams waiting for ``start`` (oldest first)."""

    def __init__(
        self,
        max_calls: int,
        reservation_s: float,
        grace_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_calls = max_calls
        self._reservation_s = reservation_s
        self._grace_s = grace_s
        self._clock = clock
        self._reserved: dict[str, float] = {}  # in expiry order (one TTL for all)
        self.waiting: dict[S, float] = {}  # stream -> when it was upgraded, oldest first

    # ----------------------------------------------------------------- webhook

    @property
    def reserved(self) -> int:
        """Calls answered with TwiML whose stream has not started (expired ones dropped)."""
        self._expire()
        return len(self._reserved)

    def full(self, calls: int) -> bool:
        """Every slot in use or reserved: the webhook answers busy."""
        return calls + self.reserved >= self.max_calls

    def reserve(self, call_sid: str, calls: int) -> bool:
        """The webhook answers ``call_sid``: hold a slot for its stream; False when full.
        A webhook retried for a call holding one keeps it (and its expiry starts again)."""
        held = self._reserved.pop(call_sid, None) is not None
        if not held and self.full(calls):
            return False
        self._reserved[call_sid] = self._clock() + self._reservation_s
        return True

    def release(self, call_sid: str) -> None:
        """The call is over before its stream started (Twilio's final status): free its slot."""
        self._reserved.pop(call_sid, None)

    def _expire(self) -> None:
        now = self._clock()
        reserved = self._reserved
        while reserved:
            call_sid, expiry = next(iter(reserved.items()))
            if expiry > now:
                return
            del reserved[call_sid]

    # ----------------------------------------------------------------- streams

    def may_upgrade(self, calls: int) -> bool:
        """A signed upgrade is taken while a call could still start."""
        return calls < self.max_calls

    def wait(self, stream: S, calls: int) -> list[S]:
        """``stream`` was upgraded and waits for ``start``; returns the waiting streams to close
        now: the oldest quiet for ``grace_s`` or more, while more wait than could start."""
        now = self._clock()
        self.waiting[stream] = now
        room = self.max_calls - calls
        evicted: list[S] = []
        waiting = self.waiting
        while len(waiting) > room:
            oldest, since = next(iter(waiting.items()))
            if now - since < self._grace_s:
                break
            del waiting[oldest]
            evicted.append(oldest)
        return evicted

    def left(self, stream: S) -> float | None:
        """``stream`` stopped waiting (started, closed, timed out): how long it waited, or
        None if it was no longer waiting (evicted)."""
        since = self.waiting.pop(stream, None)
        return None if since is None else self._clock() - since

    def start(self, call_sid: str, calls: int) -> bool:
        """A stream's ``start`` (its token checked) for ``call_sid``: True if it may become a
        call: its reservation is used up, or a slot is neither in use nor reserved."""
        self._expire()
        if self._reserved.pop(call_sid, None) is not None:
            return True
        return not self.full(calls)
