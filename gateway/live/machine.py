"""The Live session's logic as a pure state machine: events in, actions out (sans-I/O).

Nothing here does I/O or reads a clock: every input takes ``now`` and returns the
actions its owner must carry out, in order (open connection k from handle H, write
inputs to k, close k, emit a call event, fail). `gateway.live.session` is the thin
asyncio driver; `gateway.testing.explorer` drives this same class against a pure
simulated service through thousands of generated schedules.

`SessionMachine` keeps the connections (at most two: the active one and one being
opened) and decides when to open, switch, hand over and give up; each other concern is a
small pure part with its own reasons in its docstring:

* `ReplayLog` (replay): the caller's input, numbered and bounded, until no resume needs it.
* `Placement` and `HeldHandle` (handles): which input a handle holds; the one resumed from.
* `RetryBudget` (retry): backoff, and when to give up and why.
* `GoAwaySwitch` (switch): when a goAway switch is due, and how it is made.
* `Outage` (outage): the reset in progress and the resets counted.
* `RepeatFilter` (repeats): a resumed model's reply that repeats one the caller heard.
* `Nudge` (nudge): prompting a model left silent after a reset.
* `Turns` (turns) and `History` (history): who speaks; the turns that brief a fresh session.

The phase is not stored: `SessionMachine.phase` derives it from the connections, the
outage and whether the session ended. The rules the machine itself keeps
(docs/design.md, "Session survival", says which service behaviours each covers):

* Each connection knows the handle and the input number it was opened from (its
  ``base``); when it takes over it is sent every input after its own base, and only
  then the live ones. Nothing is written to a connection before it takes over.
* A handle is trusted only from the active connection, and only while no other
  connection of the session has been asked to resume: once a replacement is opened,
  the old connection's later handles may describe a forked state or the state the
  replacement took over, so they never move anybody's base.
* A replacement whose setup completes while the old connection's model is mid-reply
  waits (ready, nothing written to it) until that reply ends, so the caller hears it to
  the end and it counts as heard: a resumed model that says it again is then recognised
  instead of heard twice. It takes over at once when the caller speaks, when the old
  reply's audio stalls for ``REPLY_STALL_S`` (a service that stops the old reply once
  the new connection took the session over), when the old connection is lost, or
  ``HANDOVER_MARGIN_S`` before the old connection's announced end.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from gateway.live.events import (
    AudioDropped,
    GenerationComplete,
    GoAwayReceived,
    Interrupted,
    LiveEvent,
    ModelAudio,
    RepeatSkipped,
    ReplyAbandoned,
    ResetCause,
    Resumed,
    ToolCall,
    Transcript,
    TurnComplete,
    TurnState,
)
from gateway.live.handles import HeldHandle, IndexPlacement, Placement, RoundTripPlacement
from gateway.live.history import History
from gateway.live.nudge import Nudge
from gateway.live.outage import Outage
from gateway.live.repeats import REPEAT_WINDOW_S as REPEAT_WINDOW_S
from gateway.live.repeats import Repeat, RepeatFilter
from gateway.live.replay import BYTES_PER_SECOND as BYTES_PER_SECOND
from gateway.live.replay import Input as Input
from gateway.live.replay import ReplayLog
from gateway.live.retry import FailureReason as FailureReason
from gateway.live.retry import RetryBudget
from gateway.live.settings import LiveSettings
from gateway.live.switch import GoAwaySwitch
from gateway.live.switch import SwitchMode as SwitchMode
from gateway.live.turns import Turns

REPLY_STALL_S = 0.3  # a ready replacement stops waiting for a reply with no audio this long
HANDOVER_MARGIN_S = 0.1  # ... and takes over this long before the old connection's end


class Phase(StrEnum):
    """Where the session stands."""

    CONNECTING = "connecting"  # the first connection is being opened
    LIVE = "live"  # one active connection
    SWITCHING = "switching"  # active connection plus its replacement being opened
    RECOVERING = "recovering"  # no active connection: opening one or waiting to retry
    FAILED = "failed"
    CLOSED = "closed"


class OpenError(StrEnum):
    """Why a connection could not be opened."""

    HANDLE_REFUSED = "handle_refused"  # the service refused the resumption handle (1007/1008/4xx)
    REFUSED = "refused"  # the service refused the setup otherwise (1011, 5xx, HTTP status)
    TIMED_OUT = "timed_out"  # no setupComplete within the connect timeout
    UNREACHABLE = "unreachable"  # network error, TLS, DNS
    GARBAGE = "garbage"  # the setup was answered with something unreadable


class LossKind(StrEnum):
    """Why an open connection ended."""

    CLOSED = "closed"  # a close frame (code given)
    NETWORK = "network"  # reset, abnormal closure, stalled keep-alive
    GARBAGE = "garbage"  # the service sent something we could not read


# ------------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Open:
    """Open connection `conn`, resuming `handle` (a fresh session when None)."""

    conn: int
    handle: str | None


@dataclass(frozen=True, slots=True)
class Brief:
    """Give a fresh session the conversation so far, as prior turns (before any input)."""

    conn: int
    turns: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Write:
    """Write these inputs, in order, to `conn`; report each with `written()`."""

    conn: int
    items: tuple[Input, ...]
    replay: bool = False  # sent again into a new connection (not live input)


@dataclass(frozen=True, slots=True)
class Respond:
    """Answer a tool call on `conn`."""

    conn: int
    call_id: str
    name: str
    result: dict[str, object]


@dataclass(frozen=True, slots=True)
class Close:
    """Close `conn`; nothing more is read from it."""

    conn: int


@dataclass(frozen=True, slots=True)
class Emit:
    """Tell the call."""

    event: LiveEvent


@dataclass(frozen=True, slots=True)
class Fail:
    """The conversation cannot go on."""

    reason: FailureReason
    detail: str


Action = Open | Brief | Write | Respond | Close | Emit | Fail


# ------------------------------------------------------------------------------- state


class ConnPhase(StrEnum):
    OPENING = "opening"
    READY = "ready"  # setup complete, waiting for the active connection's reply to end
    ACTIVE = "active"


@dataclass(eq=False, slots=True)
class Conn:
    """One connection, as the machine knows it."""

    id: int
    handle: str | None  # the handle it was opened from (None: a fresh session)
    base: int  # every input <= base is in its state when its setup completes
    cause: ResetCause | None  # why it was opened (None: the call's first)
    requested_at: float
    phase: ConnPhase = ConnPhase.OPENING
    opened_at: float = 0.0  # when it became the active connection (and got its replay)
    sent: int = 0  # newest input queued to it
    placement: Placement = field(default_factory=RoundTripPlacement)  # what its handles hold
    generating: bool = False
    delivered: bool = False  # a valid message came after setup
    superseded: bool = False  # a resume was sent on another connection: distrust its handles
    ends_at: float | None = None  # when its goAway said it ends (None: no goAway)
    output_at: float = 0.0  # when its model's audio last came
    mode: SwitchMode | None = None  # how the goAway switch that opened it was made
    replies: int = 0  # model replies its state holds (those of its handle, then its own)


class SessionMachine:
    """One conversation over as many connections as it takes; pure, single-threaded.

    Its inputs are named for what happened and each returns the actions to carry out:
    from the call (`caller_audio`, `caller_text`, `tool_response`), from a connection's
    life (`opened`, `open_failed`, `lost`), from its messages (`handle_update`,
    `go_away`, `model_audio`, `transcript`, `interrupted`, `generation_complete`,
    `turn_complete`, `tool_call`, `other_message`), from the clock (`tick`, due at
    `next_deadline`), and `start`/`close`. Three reports only refine where later handles
    are placed and answer nothing: `written`, `sent` and `rtt`.
    """

    def __init__(
        self, options: LiveSettings, rng: random.Random | None = None, *, exact: bool = False
    ) -> None:
        """`exact`: handles name the last client message they hold (Vertex AI's transparent
        resumption); else they are placed by the round trip."""
        self.exact = exact
        self.retry = RetryBudget(options, rng or random.Random())
        self._ended: Phase | None = None  # FAILED or CLOSED: nothing more happens
        self.turns = Turns(options.caller_pause_s)
        self.active: Conn | None = None
        self.opening: Conn | None = None
        self._next_id = 0
        self.replay = ReplayLog(options.replay_limit_s)
        self.held = HeldHandle()
        self.switch = GoAwaySwitch(options.goaway_margin_s)
        self.outage = Outage()
        self.nudge = Nudge(options.resume_nudge_s)
        self._tool_conns: dict[str, int] = {}
        self.repeats = RepeatFilter(options.repeat_judge_s)
        self.history = History()

    # ------------------------------------------------------------------ inspection

    @property
    def phase(self) -> Phase:
        """Where the session stands, from which connections it has (the one place phases
        are decided): the active one alone, LIVE; with a replacement being opened or ready,
        SWITCHING; none, CONNECTING until the first reset, RECOVERING during one."""
        if self._ended is not None:
            return self._ended
        if self.active is not None:
            return Phase.SWITCHING if self.opening is not None else Phase.LIVE
        return Phase.RECOVERING if self.outage.cause is not None else Phase.CONNECTING

    @property
    def mode(self) -> SwitchMode:
        """How the next goAway switch is made."""
        return self.switch.mode

    @property
    def resets(self) -> dict[ResetCause, int]:
        """Resets so far, by cause."""
        return self.outage.counts

    @property
    def dropped_audio_s(self) -> float:
        """Caller audio that never reached the model (the replay log could not keep it)."""
        return self.replay.dropped_s

    @property
    def handle(self) -> str | None:
        """The newest trusted resumable handle (None before the first one)."""
        return self.held.handle

    @property
    def base(self) -> int:
        """Inputs up to this are in the state of `handle` (or were never needed)."""
        return self.held.base

    @property
    def seq(self) -> int:
        """The newest caller input's number."""
        return self.replay.seq

    @property
    def conns(self) -> list[Conn]:
        return [c for c in (self.active, self.opening) if c is not None]

    def holding(self, conn_id: int) -> bool:
        """The reply in progress on `conn_id` is held until it is judged a repeat or not."""
        active = self.active
        return active is not None and active.id == conn_id and self.repeats.judge_until is not None

    @property
    def turn_state(self) -> TurnState:
        return self.turns.state

    def caller_speaking(self, now: float) -> bool:
        return self.turns.caller_speaking(now)

    def next_deadline(self) -> float | None:
        """When `tick` must next be called (None: only on the next event)."""
        times: list[float] = []
        if self.retry.retry_at is not None:
            times.append(self.retry.retry_at)
        if self.switch.deadline is not None and self.phase is Phase.LIVE:
            times.append(self.switch.deadline)
            pause_at = self.turns.caller_pause_at()
            if pause_at is not None:
                times.append(pause_at)
        if self.nudge.at is not None:
            times.append(self.nudge.at)
        if self.repeats.judge_until is not None:
            times.append(self.repeats.judge_until)
        if self._ready() is not None:
            times.append(self._handover_due())
        return min(times) if times else None

    def check(self) -> None:
        """Internal consistency; the explorer calls it after every step."""
        assert len(self.conns) <= 2
        if self.phase is Phase.SWITCHING:
            assert self.active is not None and self.active.superseded
        if self.phase in (Phase.FAILED, Phase.CLOSED):
            assert not self.conns
        if self.active is not None:
            assert self.active.phase is ConnPhase.ACTIVE
        if self.opening is not None:
            assert self.opening.phase is not ConnPhase.ACTIVE
            assert self.opening.base <= self.seq
            if self.opening.phase is ConnPhase.READY:
                assert self.phase is Phase.SWITCHING
        self.replay.check()

    # ---------------------------------------------------------------------- start/stop

    def start(self, now: float) -> list[Action]:
        return self._open(now, cause=None)

    def continue_from(
        self, handle: str, replies: int, turns: Sequence[tuple[str, str]] = ()
    ) -> None:
        """Before `start`: the conversation goes on from a handle another process held (a
        call handed off); `replies` its state holds, `turns` brief a fresh session if the
        service refuses it."""
        assert self.phase is Phase.CONNECTING and self.opening is None and self.active is None
        self.held.offer(handle, self.held.base, replies, overlap_s=0.0)  # nothing held yet
        for role, text in turns:
            self.history.add(role, text)

    @property
    def handle_current(self) -> bool:
        """A trusted handle came since the model last spoke (it holds every reply)."""
        return self.held.handle is not None and self.switch.handle_after_reply

    @property
    def handle_replies(self) -> int:
        """Model replies the state of `handle` holds."""
        return self.held.replies

    def close(self) -> list[Action]:
        actions: list[Action] = [Close(c.id) for c in self.conns]
        self.active = self.opening = None
        self._ended = Phase.CLOSED
        self.retry.cancel()
        self.switch.cancel()
        self.nudge.cancel()
        return actions

    # ---------------------------------------------------------------------- caller side

    def caller_audio(self, pcm: bytes, speech: bool, now: float) -> list[Action]:
        if speech:
            self.turns.caller_spoke(now)
        actions = self._input(Input(0, audio=pcm, received_at=now))
        if speech:
            actions += self._maybe_hand_over(now)  # a ready replacement: the caller talks over
        return actions

    def caller_text(self, text: str, turn_complete: bool, now: float) -> list[Action]:
        return self._input(Input(0, text=text, turn_complete=turn_complete, received_at=now))

    def tool_response(self, call_id: str, name: str, result: dict[str, object]) -> list[Action]:
        """Answer on the connection that asked, if it is still the active one.

        After a reset the model's state comes from a handle issued before the call (handles
        are not resumable during tool calls), so it asks again: an answer to a connection
        that is gone is dropped.
        """
        conn_id = self._tool_conns.pop(call_id, None)
        if self.active is None or conn_id != self.active.id:
            return []
        return [Respond(conn_id, call_id, name, result)]

    def _input(self, item: Input) -> list[Action]:
        if self.phase in (Phase.FAILED, Phase.CLOSED):
            return []
        conn = self.active
        dropped = self.replay.add(item, conn.sent if conn is not None else 0)
        actions = [self._dropped(seconds) for seconds in dropped]
        if conn is not None:
            conn.sent = item.seq
            actions.append(Write(conn.id, (item,)))
        return actions

    def _dropped(self, seconds: float) -> Action:
        return Emit(AudioDropped(seconds))

    def _trim(self) -> None:
        """Forget input no future replay can need: at or below every base still in use."""
        floor = self.base
        if self.opening is not None:
            floor = min(floor, self.opening.base)
        self.replay.forget_upto(floor)

    # ---------------------------------------------------------------- connections

    def _open(self, now: float, cause: ResetCause | None) -> list[Action]:
        assert self.opening is None
        self._next_id += 1
        held = self.held
        conn = Conn(self._next_id, held.handle, held.base, cause, now, placement=self._placement())
        conn.replies = held.replies
        self.opening = conn
        self.retry.opening(now)
        if self.active is not None:
            self.active.superseded = True
        return [Open(conn.id, conn.handle)]

    def opened(self, conn_id: int, now: float) -> list[Action]:
        """Connection `conn_id` completed its setup."""
        conn = self.opening
        if conn is None or conn.id != conn_id or conn.phase is not ConnPhase.OPENING:
            return [Close(conn_id)]  # no longer wanted
        conn.phase = ConnPhase.READY
        return self._maybe_hand_over(now)

    # ------------------------------------------------------------- handover

    def _ready(self) -> Conn | None:
        """The replacement that is set up and waits for the old connection's reply to end."""
        conn = self.opening
        return conn if conn is not None and conn.phase is ConnPhase.READY else None

    def _handover_due(self) -> float:
        """The latest a ready replacement may wait for the active connection's reply."""
        old = self.active
        if old is None or not old.generating or self.turns.unanswered:
            return -1e9  # no reply, or the caller talks over it: at once
        due = old.output_at + REPLY_STALL_S
        if old.ends_at is not None:
            due = min(due, old.ends_at - HANDOVER_MARGIN_S)
        return due

    def _maybe_hand_over(self, now: float) -> list[Action]:
        if self._ready() is None or now < self._handover_due():
            return []
        return self._hand_over(now)

    def _hand_over(self, now: float) -> list[Action]:
        """The ready replacement becomes the active connection."""
        conn = self.opening
        assert conn is not None and conn.phase is ConnPhase.READY
        self.opening = None
        conn.phase = ConnPhase.ACTIVE
        conn.opened_at = now
        actions: list[Action] = []
        if conn.handle is None and conn.cause is not None:
            turns = self.history.recent()
            if turns:
                actions.append(Brief(conn.id, turns))
        # Everything after its own base, then the live input.
        lost = self.replay.lost_after(conn.base)
        if lost is not None:
            actions.append(self._dropped(lost))
        replay = self.replay.after(conn.base)
        replayed_s = sum(item.seconds for item in replay)
        if replay:
            actions.append(Write(conn.id, replay, replay=True))
        conn.sent = self.seq
        old = self.active
        if old is not None:
            actions.extend(self._abandon_reply(old, ResetCause.GOAWAY))
            actions.append(Close(old.id))
        self.active = conn
        self.repeats.stop()
        if conn.cause is not None:
            self.repeats.resumed(conn.replies)
            cause = self.outage.counted(conn.cause)
            gap = self.outage.gap(now)
            if old is not None and self.switch.forced:
                gap = now - conn.requested_at  # the model was mid-reply or the caller mid-word
            mode = conn.mode.value if conn.mode is not None else ""
            overlap = self.held.overlap_s if conn.handle is not None else 0.0
            resumed = Resumed(
                cause,
                gap,
                replayed_s,
                self.retry.attempts,
                conn.handle is None,
                mode,
                overlap,
                conn.handle,
                replay[0].offset if replay else self.replay.total_bytes,
            )
            actions.append(Emit(resumed))
        self.outage.over()
        self.switch.cancel()
        if conn.cause is not None:
            self.nudge.resumed(now, unanswered=self.turns.unanswered)
        self._trim()
        if conn.ends_at is not None:
            actions += self._switch_before(conn.ends_at, now)  # announced while it waited
        return actions

    def open_failed(self, conn_id: int, error: OpenError, detail: str, now: float) -> list[Action]:
        """Connection `conn_id` could not be opened."""
        conn = self.opening
        if conn is None or conn.id != conn_id:
            return []
        self.opening = None
        actions: list[Action] = []
        if error is OpenError.HANDLE_REFUSED and conn.handle is not None:
            # The handle is gone for good: carry the call on a fresh session, briefed with
            # the conversation, replaying what the old session's handle lacked. At once.
            self.held.refused()
            self.outage.handle_refused = True
            self.retry.handle_refused()
            return actions + self._reopen(now, ResetCause.REFUSED, immediate=True)
        self.retry.failed(_failure_reason(error), detail)
        if self.active is not None:
            # A make-before-break open failed. The old connection is superseded (if the
            # service let the new one take over before failing, input on the old one is
            # being dropped), so break now and resume from the same handle; if it was a
            # refusal, switch break-before-make for the rest of the call.
            if error is OpenError.REFUSED:
                self.switch.second_connection_refused()
            actions.extend(self._lose_active(now, ResetCause.GOAWAY))
            actions += self._reopen(now, ResetCause.GOAWAY, immediate=True)
            if self.opening is not None and conn.mode is not None:
                self.opening.mode = SwitchMode.BREAK_BEFORE_MAKE
            return actions
        return actions + self._reopen(now, self.outage.cause or ResetCause.ABRUPT)

    def lost(self, conn_id: int, kind: LossKind, detail: str, now: float) -> list[Action]:
        """An open connection ended (close frame, network error, unreadable message)."""
        ready = self._ready()
        if ready is not None and ready.id == conn_id:
            # The replacement was lost before it took over: as if it had not opened.
            return [Close(conn_id), *self.open_failed(conn_id, OpenError.UNREACHABLE, detail, now)]
        conn = self.active
        if conn is None or conn.id != conn_id:
            return []  # an old connection being closed, or one we already gave up
        if not conn.delivered:
            self.retry.failed(_loss_reason(kind), detail)
        cause = ResetCause.GOAWAY if conn.ends_at is not None else ResetCause.ABRUPT
        actions = self._lose_active(now, cause)
        if self._ready() is not None:
            return actions + self._hand_over(now)
        if self.opening is not None:
            return actions  # its replacement is on the way
        return actions + self._reopen(now, cause)

    def _lose_active(self, now: float, cause: ResetCause) -> list[Action]:
        conn = self.active
        assert conn is not None
        actions = self._abandon_reply(conn, cause)
        actions.append(Close(conn.id))
        self.active = None
        self.outage.lost(now, cause)
        self.switch.cancel()
        self.nudge.cancel()
        return actions

    def _abandon_reply(self, conn: Conn, cause: ResetCause) -> list[Action]:
        if not conn.generating or conn is not self.active:
            return []
        conn.generating = False
        self.turns.idle()
        repeats = self.repeats
        skipping, judging = repeats.skipping is not None, repeats.judge_until is not None
        repeats.stop()
        if skipping:
            return []  # a repeat nobody heard: what the caller heard before stands
        self.nudge.reply_cut("" if judging else repeats.text)
        return [Emit(ReplyAbandoned(cause))]

    def _reopen(self, now: float, cause: ResetCause, immediate: bool = False) -> list[Action]:
        """Open the next connection now or after a backoff, within the retry budget."""
        self.outage.cause = cause
        given_up = self.retry.exhausted(now)
        if given_up is not None:
            actions = self.close()
            self._ended = Phase.FAILED
            return [*actions, Fail(*given_up)]
        if immediate or self.retry.attempts == 0:
            return self._open(now, cause)
        self.outage.lost(now, cause)
        self.retry.back_off(now)
        return []

    def rtt(self, conn_id: int, seconds: float) -> None:
        """A measured round trip on `conn_id` (places its handles more tightly)."""
        for conn in self.conns:
            if conn.id == conn_id:
                conn.placement.measured(seconds)

    def setup_rtt(self, conn_id: int, seconds: float) -> None:
        """How long `conn_id`'s setup took to be answered (bounds its round trip)."""
        for conn in self.conns:
            if conn.id == conn_id:
                conn.placement.setup(seconds)

    def written(self, conn_id: int, seq: int, now: float) -> None:
        """Input `seq` (and all before it) left for connection `conn_id`."""
        conn = self.active
        if conn is None or conn.id != conn_id:
            return
        conn.placement.written(seq, now)

    def sent(self, conn_id: int, seq: int | None) -> None:
        """One client message is being written to `conn_id` (any, in the order they go
        out); the newest input in it or before it is `seq` (None: it carries none)."""
        for conn in self.conns:
            if conn.id == conn_id:
                conn.placement.sent(seq)

    def _placement(self) -> Placement:
        """How a new connection's handles are placed."""
        return IndexPlacement() if self.exact else RoundTripPlacement()

    # ---------------------------------------------------------------- server messages

    def _from_active(self, conn_id: int) -> Conn | None:
        conn = self.active
        if conn is None or conn.id != conn_id:
            return None
        if not conn.delivered:
            conn.delivered = True
            self.retry.delivered()
        return conn

    def handle_update(
        self,
        conn_id: int,
        handle: str | None,
        resumable: bool,
        now: float,
        consumed: int | None = None,
        arrived: float | None = None,
    ) -> list[Action]:
        """A handle from `conn_id`; `consumed`: the last of its client messages the handle
        holds, where the service says so (`sent` numbers them); `arrived`: when its message
        reached the connection, if known and earlier than `now` (placed from then: input
        written after it arrived is not in it, however late it is read)."""
        conn = self._from_active(conn_id)
        if conn is None or conn.superseded or not resumable or not handle:
            return []
        held, placement = self.held, conn.placement
        covered = placement.covered(now if arrived is None else min(arrived, now), consumed)
        # A later handle of the same lineage covers at least what the one before it did.
        base = max(held.base, conn.base if covered is None else covered)
        newest = placement.newest()
        overlap = self.replay.seconds_between(base, conn.base if newest is None else newest)
        if not conn.generating:
            self.switch.handle_after_reply = True
        if held.offer(handle, base, conn.replies, overlap):
            self._trim()
        return self._maybe_switch(now)

    def go_away(self, conn_id: int, time_left_s: float, now: float) -> list[Action]:
        ready = self._ready()
        if ready is not None and ready.id == conn_id:
            ready.ends_at = now + time_left_s  # acted on when it takes over
            return [Emit(GoAwayReceived(time_left_s))]
        conn = self._from_active(conn_id)
        if conn is None:
            return []
        conn.ends_at = now + time_left_s
        actions: list[Action] = [Emit(GoAwayReceived(time_left_s))]
        if conn.superseded:
            return actions  # its replacement is already being opened
        return actions + self._switch_before(conn.ends_at, now)

    def _switch_before(self, ends_at: float, now: float) -> list[Action]:
        """Switch at a pause, at the latest `goaway_margin_s` before the connection ends."""
        self.switch.announced(ends_at, now)
        return self._maybe_switch(now)

    def model_audio(self, conn_id: int, chunks: list[bytes], now: float) -> list[Action]:
        """Pieces of the model's reply arrived on `conn_id`: played, held or dropped."""
        conn = self.active
        if conn is None or conn.id != conn_id:
            return []
        if not conn.delivered:
            self._from_active(conn_id)
        conn.output_at = now
        repeats = self.repeats
        if not conn.generating:
            conn.generating = True
            self.switch.handle_after_reply = False
            self.turns.reply_began(now)
            repeats.began(now, now - conn.opened_at)
        if repeats.skipping is not None:
            return []
        if repeats.judge_until is not None:
            for pcm in chunks:
                repeats.hold(ModelAudio(pcm, now))
            return []
        self.nudge.heard()
        return [Emit(ModelAudio(pcm, now)) for pcm in chunks]

    def transcript(self, conn_id: int, role: str, text: str) -> list[Action]:
        if self._from_active(conn_id) is None or not text:
            return []
        if role == "caller":
            self.history.add("user", text)
            return [Emit(Transcript("caller", text))]
        repeats = self.repeats
        repeats.text += text
        event = Transcript("model", text)
        if repeats.skipping is not None:
            if not repeats.diverges():
                return []
            # It goes on differently from what the caller heard: play the rest.
            self.nudge.cancel()
        if repeats.judge_until is not None:
            repeats.hold(event)
            return self._judge(final=False)
        self.history.add("model", text)
        return [Emit(event)]

    def interrupted(self, conn_id: int, now: float) -> list[Action]:
        conn = self._from_active(conn_id)
        if conn is None:
            return []
        conn.generating = False
        self.turns.interrupted()
        unheard = self.repeats.unheard
        self.repeats.stop()
        actions: list[Action] = [] if unheard else [Emit(Interrupted())]
        return actions + self._maybe_hand_over(now)

    def generation_complete(self, conn_id: int) -> list[Action]:
        if self._from_active(conn_id) is None:
            return []
        actions = self._judge(final=True) if self.repeats.judge_until is not None else []
        if self.repeats.skipping is not None:
            return actions
        return [*actions, Emit(GenerationComplete())]

    def turn_complete(self, conn_id: int, now: float) -> list[Action]:
        conn = self._from_active(conn_id)
        if conn is None:
            return []
        actions = self._judge(final=True) if self.repeats.judge_until is not None else []
        spoke = conn.generating
        conn.generating = False
        self.turns.idle()
        if spoke:
            conn.replies += 1
        if self.repeats.ended(conn.replies if spoke else None, now):
            return [*actions, *self._maybe_switch(now), *self._maybe_hand_over(now)]
        return [
            *actions,
            Emit(TurnComplete()),
            *self._maybe_switch(now),
            *self._maybe_hand_over(now),
        ]

    # ------------------------------------------------------- replies said again

    def _judge(self, final: bool) -> list[Action]:
        """Does the held reply repeat one the caller heard in full since the resumed state?"""
        verdict = self.repeats.judge(final)
        if verdict is None:
            return []
        if not isinstance(verdict, Repeat):
            return self._release()
        turns = self.turns
        self.nudge.repeat_skipped(turns.caller_spoke_at > verdict.heard_at, turns.reply_began_at)
        return [Emit(RepeatSkipped(verdict.text, verdict.held_s))]

    def _release(self) -> list[Action]:
        """Play what was held: the model says something new (or could not be judged)."""
        held = self.repeats.release()
        self.nudge.heard()
        for event in held:
            if isinstance(event, Transcript):
                self.history.add("model", event.text)
        return [Emit(event) for event in held]

    def tool_call(
        self, conn_id: int, call_id: str, name: str, args: dict[str, object]
    ) -> list[Action]:
        if self._from_active(conn_id) is None:
            return []
        self._tool_conns[call_id] = conn_id
        return [Emit(ToolCall(call_id, name, dict(args)))]

    def other_message(self, conn_id: int) -> list[Action]:
        """Any other valid message: the connection works."""
        self._from_active(conn_id)
        return []

    # ------------------------------------------------------------------------ timers

    def tick(self, now: float) -> list[Action]:
        actions: list[Action] = []
        if self.retry.due(now) and self.opening is None:
            actions += self._open(now, self.outage.cause or ResetCause.ABRUPT)
        if self.repeats.judge_until is not None and now >= self.repeats.judge_until:
            actions += self._release()
        if self.nudge.at is not None and now >= self.nudge.at:
            actions += self._nudge(now)
        actions += self._maybe_switch(now)
        actions += self._maybe_hand_over(now)
        return actions

    def _nudge(self, now: float) -> list[Action]:
        """The model has said nothing since a reset that left the caller waiting."""
        quiet_at = self.turns.caller_pause_at() if self.caller_speaking(now) else None
        text = self.nudge.due(now, quiet_at, self.repeats.unheard)
        return self.caller_text(text, True, now) if text is not None else []

    def _maybe_switch(self, now: float) -> list[Action]:
        """On goAway: move to a new connection at a turn boundary, or at the deadline."""
        conn = self.active
        if self.switch.deadline is None or conn is None or self.phase is not Phase.LIVE:
            return []
        clean = (
            not conn.generating
            and self.switch.handle_after_reply
            and self.held.handle is not None
            and not self.caller_speaking(now)
        )
        if not self.switch.due(now, clean):
            return []
        self.switch.made(clean)
        mode = self.switch.mode
        actions: list[Action] = []
        if mode is SwitchMode.BREAK_BEFORE_MAKE:
            actions.extend(self._lose_active(now, ResetCause.GOAWAY))
        actions += self._open(now, ResetCause.GOAWAY)
        assert self.opening is not None
        self.opening.mode = mode
        return actions


def _failure_reason(error: OpenError) -> FailureReason:
    return {
        OpenError.HANDLE_REFUSED: FailureReason.REFUSED,
        OpenError.REFUSED: FailureReason.REFUSED,
        OpenError.TIMED_OUT: FailureReason.TIMED_OUT,
        OpenError.UNREACHABLE: FailureReason.UNREACHABLE,
        OpenError.GARBAGE: FailureReason.GARBAGE,
    }[error]


def _loss_reason(kind: LossKind) -> FailureReason:
    return {
        LossKind.CLOSED: FailureReason.UNREACHABLE,
        LossKind.NETWORK: FailureReason.UNREACHABLE,
        LossKind.GARBAGE: FailureReason.GARBAGE,
    }[kind]
