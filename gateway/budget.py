"""A persona's daily spend (`max_day_usd`), counted in the store every replica shares.

Each call adds its cost to its persona's counter for the day as the service reports its
tokens (`Call` hands each increment to :meth:`DaySpend.add`); the counter is for the UTC
day on which the increment came, and expires `KEEP_AFTER_S` past that day's end. The
answer is the day's total from every replica: the call wraps up once it passes the limit,
and the voice webhook turns the persona's new calls away while it does
(:meth:`DayBudget.over`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

from gateway.store import CallStore, StoreError

log = logging.getLogger(__name__)

#: A day's counter outlives the day by this much (a clock a little off still finds it).
KEEP_AFTER_S: Final = 3600.0
_DAY_S: Final = 86400.0


def utc_day(now: float) -> str:
    """The UTC day of the epoch time `now`, as YYYY-MM-DD (the counter's name)."""
    return time.strftime("%Y-%m-%d", time.gmtime(now))


def keep_s(now: float) -> float:
    """How long a counter written at `now` is kept: to its day's end, and a margin."""
    return _DAY_S - now % _DAY_S + KEEP_AFTER_S


class DayBudget:
    """Every persona's spend today, read and added to through the shared store."""

    def __init__(self, store: CallStore, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    async def add(self, persona: str, usd: float) -> float:
        """Add a call's cost increment; the persona's total today (may raise StoreError)."""
        now = self._clock()
        return await self._store.add_spend(persona, utc_day(now), usd, keep_s(now))

    def adder(self, persona: str) -> Callable[[float], Awaitable[float | None]]:
        """What a call of `persona` hands its cost increments to: the day's total, or
        None (and a warning) when the store failed (that increment is not counted)."""

        async def add(usd: float) -> float | None:
            try:
                return await self.add(persona, usd)
            except StoreError as error:
                log.warning("day's spend not counted: %s", error)
                return None

        return add

    async def over(self, persona: str, limit_usd: float) -> bool:
        """Whether the persona's spend today has reached `limit_usd` (0: never)."""
        if not limit_usd:
            return False
        return await self._store.spent(persona, utc_day(self._clock())) >= limit_usd
