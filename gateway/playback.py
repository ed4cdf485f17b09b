"""What of the model's speech the caller has heard, and waiting until they have.

Twilio plays the model's audio from a queue, so what was sent is not what was heard. The
call sends a `mark` after each reply; Twilio echoes it once everything before it played
(and at once for marks still queued when the call sends `clear`). `Playback` keeps that
account, no I/O and no clock of its own: replies sent and heard, marks outstanding,
which turn the model is in and when it began. `Speaker` is the thin driver: it turns the
model's audio into Twilio `media`, sends the marks and `clear`, and lets the call wait
until the caller has heard everything (a goodbye before the hang-up, a tool's last words
before the transfer).

Waits are woken by what can end them (a mark echoed, a turn over, playback cleared) and
by the one time they know of (the settle time after the model's last audio). The session
reports the end of every turn the call played; a turn it held back or skipped (a reply
the caller already heard, repeated after a reset) ends without an event, so while the
session says the model speaks a turn the call has not seen, a wait looks again every
`UNSEEN_TURN_RECHECK_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway.audio import ModelToCaller
from gateway.twilio.protocol import clear_message, mark_message, media_message

#: How often a wait looks at a turn the session plays without telling the call.
UNSEEN_TURN_RECHECK_S = 0.05
#: Prefix of the marks that end the model's replies.
REPLY_MARK = "reply-"


@dataclass(frozen=True)
class HeardWait:
    """What one wait for the caller to have heard the model counts as done.

    Done when nothing plays or awaits its mark and the model's turn is over: a turn
    completed since `began`, or `settle_s` passed without model audio (the model may speak
    after a tool response). With `turn_after`, only a whole turn whose audio began after
    that time will do (the answer to an instruction sent then).
    """

    began: float
    turns: int  # turns completed when the wait began
    settle_s: float
    turn_after: float | None


class Playback:
    """The account of what the model said and what the caller has heard of it."""

    def __init__(self) -> None:
        self.reply_open = False  # model audio sent that no mark follows yet
        self.marks_pending: set[str] = set()
        self.replies_sent = 0
        self.replies_heard = 0
        self.turns_completed = 0
        self.audio_at = 0.0  # when the newest model audio came
        self._turn_began_at: float | None = None  # the current turn's first audio
        self._last_turn_began_at = -1.0  # the newest completed turn's first audio

    @property
    def in_turn(self) -> bool:
        """Model audio of the current turn has come."""
        return self._turn_began_at is not None

    def audio(self, at: float) -> bool:
        """Model audio (received `at`) goes to the caller; True when it begins a turn."""
        began = self._turn_began_at is None
        if began:
            self._turn_began_at = at
        self.reply_open = True
        self.audio_at = at
        return began

    def end_reply(self) -> str | None:
        """The open reply ends: the name of the mark to send after it (None: none open)."""
        if not self.reply_open:
            return None
        self.reply_open = False
        self.replies_sent += 1
        name = f"{REPLY_MARK}{self.replies_sent}"
        self.marks_pending.add(name)
        return name

    def turn_complete(self) -> None:
        self.turns_completed += 1
        if self._turn_began_at is not None:
            self._last_turn_began_at = self._turn_began_at
        self._turn_began_at = None

    def turn_cut(self) -> None:
        """The model's turn ended unfinished (the caller talked over it, or it was lost)."""
        self._turn_began_at = None

    def mark(self, name: str) -> bool:
        """Twilio played up to mark `name`; True if the caller has now heard all of it."""
        if name not in self.marks_pending:
            return False
        self.marks_pending.discard(name)
        if name.startswith(REPLY_MARK):
            self.replies_heard += 1
        return not self.marks_pending and not self.reply_open

    def cleared(self) -> None:
        """Twilio dropped its queue (`clear`): its marks no longer count."""
        self.marks_pending.clear()

    def playing(self, model_speaking: bool) -> bool:
        """A reply is playing or not yet confirmed heard, or the model is speaking."""
        return self.reply_open or bool(self.marks_pending) or model_speaking

    def wait(self, now: float, settle_s: float, turn_after: float | None = None) -> HeardWait:
        """A wait beginning `now` (see `HeardWait`)."""
        return HeardWait(now, self.turns_completed, settle_s, turn_after)

    def heard(self, wait: HeardWait, now: float, model_speaking: bool) -> tuple[bool, float | None]:
        """Whether `wait` is done at `now`; if not, when to look again (None: not before
        something changes)."""
        turn_done = self.turns_completed > wait.turns
        settles_at = max(wait.began, self.audio_at) + wait.settle_s
        if wait.turn_after is not None:
            done = self._last_turn_began_at >= wait.turn_after
        else:
            done = turn_done or now >= settles_at
        if done and not self.playing(model_speaking):
            return True, None
        wake: float | None = None
        if wait.turn_after is None and not turn_done and now < settles_at:
            wake = settles_at
        if model_speaking and not self.in_turn:
            recheck = now + UNSEEN_TURN_RECHECK_S
            wake = recheck if wake is None else min(wake, recheck)
        return False, wake


class Changes:
    """Wakes everyone waiting for a change: each waiter holds the event current when it
    began to wait, and `notify` sets it and starts a new one."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, until: float | None) -> None:
        """Until the next `notify`, or the monotonic time `until` (None: no limit)."""
        event = self._event
        delay = None if until is None else max(0.0, until - time.monotonic())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await event.wait()


class Speaker:
    """Plays the model's replies on the call's media stream, and waits on `Playback`.

    `model_speaking` tells whether the session has the model mid-turn (it may hold audio
    back); `on_sent` gets each piece's delay from the model to the caller; waits give up
    after `wait_limit_s`.
    """

    def __init__(
        self,
        send: Callable[[str], Awaitable[None]],
        stream_sid: str,
        model_speaking: Callable[[], bool],
        *,
        wait_limit_s: float,
        on_sent: Callable[[float], None],
    ) -> None:
        self.state = Playback()
        self.changes = Changes()
        self._send = send
        self._stream_sid = stream_sid
        self._model_speaking = model_speaking
        self._wait_limit_s = wait_limit_s
        self._on_sent = on_sent
        self._resampler = ModelToCaller()

    async def play(self, pcm: bytes, received_at: float) -> bool:
        """Send a piece of the model's reply (24 kHz PCM); True when it begins a turn."""
        ulaw = self._resampler.convert(pcm)
        began = self.state.audio(received_at)
        if ulaw:
            await self._send(media_message(self._stream_sid, ulaw))
            self._on_sent(time.monotonic() - received_at)
        return began

    async def end_reply(self) -> None:
        """Flush the resampler and mark the end of the reply, once per reply."""
        name = self.state.end_reply()
        if name is None:
            return
        tail = self._resampler.flush()
        if tail:
            await self._send(media_message(self._stream_sid, tail))
        await self._send(mark_message(self._stream_sid, name))

    def turn_complete(self) -> None:
        self.state.turn_complete()
        self.changes.notify()

    def turn_cut(self) -> None:
        self.state.turn_cut()
        self.changes.notify()

    def mark(self, name: str) -> bool:
        """A mark came back; True if the caller has now heard everything."""
        quiet = self.state.mark(name)
        self.changes.notify()
        return quiet

    async def clear(self) -> None:
        """Twilio drops its queue at once; the resampler forgets the old reply."""
        self._resampler.reset()
        self.state.reply_open = False
        await self._send(clear_message(self._stream_sid))
        self.state.cleared()
        self.changes.notify()

    async def wait_heard(self, settle_s: float = 1.0, *, turn_after: float | None = None) -> bool:
        """Until the caller has heard everything the model said and it says no more (see
        `HeardWait`); False when `wait_limit_s` ran out first."""
        wait = self.state.wait(time.monotonic(), settle_s, turn_after)
        deadline = wait.began + self._wait_limit_s
        while True:
            now = time.monotonic()
            done, wake = self.state.heard(wait, now, self._model_speaking())
            if done:
                return True
            if now >= deadline:
                return False
            await self.changes.wait(deadline if wake is None else min(wake, deadline))

    async def wait_quiet(self) -> None:
        """Until nothing plays (at most `wait_limit_s`)."""
        deadline = time.monotonic() + self._wait_limit_s
        while True:
            model_speaking = self._model_speaking()
            now = time.monotonic()
            if not self.state.playing(model_speaking) or now >= deadline:
                return
            wake = deadline
            if model_speaking and not self.state.in_turn:
                wake = min(wake, now + UNSEEN_TURN_RECHECK_S)
            await self.changes.wait(wake)
