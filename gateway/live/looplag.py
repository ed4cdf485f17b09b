"""How late this process's event loop runs what is due, lately: a bound on how long bytes the
kernel already had waited to be read.

`gateway.live.sdk.TimedSocket` stamps a message when the loop handed its bytes to the
connection; the kernel may have had them up to one busy loop iteration (or a time slice the
process waited for a core) before that. A handle placed from the stamp would then be placed
that much late, past input the service may not have had. The driver subtracts the loop's
lag around the stamp from it (an earlier stamp only replays more): one timer per loop,
however many sessions use it, fires every ``TICK_S`` and notes how late it ran;
:meth:`LoopLag.around` is the most it ran late within ``SPAN_S`` of a moment (a busy stretch
that held the bytes back also held back the timer due in it, which notes it as it ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator

__all__ = ["LoopLag", "loop_lag"]

TICK_S = 0.01
SPAN_S = 0.1
WINDOW_S = 2.0  # kept: a message read up to this long after its bytes came


class LoopLag:
    """One event loop's lateness, measured while any session holds it (`hold`)."""

    def __init__(self) -> None:
        self._lags: deque[tuple[float, float]] = deque()  # (when noted, how late), in order
        self._users = 0
        self._task: asyncio.Task[None] | None = None

    def around(self, at: float) -> float:
        """The most the loop ran late within ``SPAN_S`` of `at`, as noted so far (0: no
        timer ran then: the loop was not measured)."""
        most = 0.0
        for when, late in reversed(self._lags):
            if when < at - SPAN_S:
                break
            if when <= at + SPAN_S:
                most = max(most, late)
        return most

    def note(self, now: float, late: float) -> None:
        """The timer due at ``now - late`` ran at ``now``."""
        self._lags.append((now, late))
        self._forget(now)

    def _forget(self, now: float) -> None:
        while self._lags and self._lags[0][0] < now - WINDOW_S:
            self._lags.popleft()

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[LoopLag]:
        """Measure while in the block (the timer stops when the last holder leaves)."""
        self._users += 1
        if self._task is None:
            self._task = asyncio.create_task(self._measure(), name="loop-lag")
        try:
            yield self
        finally:
            self._users -= 1
            if self._users == 0 and self._task is not None:
                task, self._task = self._task, None
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _measure(self) -> None:
        while True:
            due = time.monotonic() + TICK_S
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            self.note(now, max(0.0, now - due))


_LAGS: dict[asyncio.AbstractEventLoop, LoopLag] = {}


def loop_lag() -> LoopLag:
    """The running loop's (made on first use; forgotten when the loop closes)."""
    loop = asyncio.get_running_loop()
    for other in [other for other in _LAGS if other.is_closed()]:
        del _LAGS[other]
    lag = _LAGS.get(loop)
    if lag is None:
        lag = _LAGS[loop] = LoopLag()
    return lag
