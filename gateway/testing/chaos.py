"""Disruptions at random moments for the Live emulator: announced and abrupt cuts of every kind.

The emulator's own timers end each connection at a fixed point of its life; a real service
also drops connections at moments nobody chose. :class:`Chaos` picks, every U(``every``)
seconds, one open connection and one kind of disruption (seeded, so a failing schedule can be
replayed) and records what it did, so a test or the soak can say which cut a caller's wait
came from:

==================  =========================================================================
kind                what happens to the chosen connection
==================  =========================================================================
``goaway``          ``goAway{timeLeft}`` with timeLeft U(``goaway_time_left``), from well
                    under one setup latency up; then a close 1000 or 1011 at the deadline
``reset``           a TCP reset
``close-1000`` ...  a close frame with that code (1000, 1007, 1008, 1011)
``during-setup``    a TCP reset of a connection whose setup is not answered yet (if none is
                    in setup now: a reset first, then the client's resume is cut)
``mid-reply``       a TCP reset while it says a reply, U(``mid_reply_after``) into it, with
                    at least ``mid_reply_left`` of its audio still to come (else none)
``after-handle``    a TCP reset right after it issued a resumption handle
``twice``           a TCP reset, then the session's next connection reset as soon as its
                    setup is answered (while the client replays into it)
``refuse-http``     the next connection refused with HTTP 503, then a TCP reset
==================  =========================================================================
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.testing.live_emulator import ConnectionRecord, LiveEmulator

KINDS = (
    "goaway",
    "reset",
    "close-1000",
    "close-1007",
    "close-1008",
    "close-1011",
    "during-setup",
    "mid-reply",
    "after-handle",
    "twice",
    "refuse-http",
)
WAIT_S = 3.0  # longest wait for the moment a kind needs (a setup, a reply, a handle)
STEP_S = 0.005


@dataclass(frozen=True)
class Disruption:
    """One thing :class:`Chaos` did: when (monotonic), what, to which connection/session."""

    at: float
    kind: str
    connection_id: int
    session_id: str


@dataclass
class ChaosConfig:
    every: tuple[float, float] = (1.5, 3.0)  # seconds between disruptions, U(min, max)
    kinds: tuple[str, ...] = KINDS
    goaway_time_left: tuple[float, float] = (0.05, 1.6)
    mid_reply_after: tuple[float, float] = (0.0, 0.3)  # into the reply, U(min, max)
    # ... and only while at least this share of its audio is still to come: a cut in a reply's
    # last fifth (the caller has heard most of it, and may talk on: the test caller does past
    # 0.7 of 0.8 s) is a corner of its own.
    mid_reply_left: float = 0.2
    seed: int = 0


@dataclass
class Chaos:
    """:meth:`start` and :meth:`stop` (or run :meth:`run` as a task and cancel it); ``done``
    lists what was done."""

    emulator: LiveEmulator
    config: ChaosConfig = field(default_factory=ChaosConfig)
    done: list[Disruption] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.config.seed)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Run in a task of its own until :meth:`stop`."""
        if self._task is None:
            self._task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def run(self) -> None:
        """Until cancelled. A disruption that waits for its moment (a setup, a reply, a
        handle) does not hold up the next one: several may be under way at once."""
        pending: set[asyncio.Task[bool]] = set()
        try:
            while True:
                lo, hi = self.config.every
                await asyncio.sleep(self._rng.uniform(lo, hi))
                task = asyncio.create_task(self.disrupt(self._rng.choice(self.config.kinds)))
                pending.add(task)
                task.add_done_callback(pending.discard)
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def counts(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for d in self.done:
            found[d.kind] = found.get(d.kind, 0) + 1
        return found

    async def disrupt(self, kind: str) -> bool:
        """Do one disruption of ``kind`` now (or at the moment it needs); False if there was
        nothing to do it to."""
        emu = self.emulator
        if kind == "during-setup":
            if not emu.in_setup():  # make one: a reset, and the client's resume is cut
                ready = self._pick(self._ready())
                if ready is None:
                    return False
                await self._reset(ready, "reset")
            cid = await self._wait_for(lambda: self._pick(emu.in_setup()))
            return cid is not None and await self._reset(cid, kind)
        if kind == "mid-reply":
            cid = await self._wait_for(lambda: self._pick(emu.replying()))
            if cid is None:
                return False
            await asyncio.sleep(self._rng.uniform(*self.config.mid_reply_after))
            if emu.reply_left(cid) < self.config.mid_reply_left:
                return False
            return cid in emu.replying() and await self._reset(cid, kind)
        cid = self._pick(self._ready())
        if cid is None:
            return False
        if kind == "goaway":
            left = self._rng.uniform(*self.config.goaway_time_left)
            code = self._rng.choice((1000, 1011))
            self._note(kind, cid)
            return emu.go_away(cid, left, code=code)
        if kind.startswith("close-"):
            self._note(kind, cid)
            await emu.cut(cid, code=int(kind.removeprefix("close-")))
            return True
        if kind == "after-handle":
            rec = self._record(cid)
            issued = rec.handles_issued
            found = await self._wait_for(lambda: cid if rec.handles_issued > issued else None)
            return found is not None and await self._reset(cid, kind)
        if kind == "twice":
            rec = self._record(cid)
            await self._reset(cid, kind)
            known = len(emu.record.connections)

            def next_one() -> int | None:
                for later in emu.record.connections[known:]:
                    if later.session_id == rec.session_id and later.setup_completed_at:
                        return later.id
                return None

            second = await self._wait_for(next_one)
            return second is not None and await self._reset(second, kind)
        if kind == "refuse-http":
            emu.refuse_next(1, how="http")
            return await self._reset(cid, kind)
        return await self._reset(cid, "reset")

    def _ready(self) -> list[int]:
        setting_up = set(self.emulator.in_setup())
        return [cid for cid in self.emulator.open_connections() if cid not in setting_up]

    def _pick(self, ids: list[int]) -> int | None:
        return self._rng.choice(ids) if ids else None

    def _record(self, cid: int) -> ConnectionRecord:
        return next(c for c in self.emulator.record.connections if c.id == cid)

    def _note(self, kind: str, cid: int) -> None:
        rec = self._record(cid)
        session = rec.session_id
        if not session:  # in its setup: the session its handle resumes, if any
            resumption = rec.setup.get("sessionResumption")
            handle = resumption.get("handle") if isinstance(resumption, dict) else None
            issued = self.emulator.record.handles_issued.get(handle) if handle else None
            session = issued[0] if issued else ""
        self.done.append(Disruption(time.monotonic(), kind, cid, session))

    async def _reset(self, cid: int, kind: str) -> bool:
        if cid not in self.emulator.open_connections():
            return False
        self._note(kind, cid)
        await self.emulator.cut(cid)
        return True

    async def _wait_for(self, find: Callable[[], int | None]) -> int | None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            found = find()
            if found is not None:
                return found
            await asyncio.sleep(STEP_S)
        return None


__all__ = ["KINDS", "Chaos", "ChaosConfig", "Disruption"]
