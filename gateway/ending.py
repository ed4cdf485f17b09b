"""How a call ends: one decision for every reason, made once.

A call ends for many reasons: the model's tools (`end_call`, `transfer_call`), the
gateway's own moves (`gateway.watch`: a silent caller, the persona's limits), an answering
machine or a fax on an outbound call, and the line going away under it (Twilio's `stop`,
the stream closing, the Live session failing, the stream breaking the protocol, a
shutdown). Each begins the same way, `Ending.begin(reason)`, which answers with the plan
for that reason or None when the call is already ending; the call carries the plan out.

A plan is what the caller hears first (`Prelude`) and how the call is then ended
(`Finish`). The first reason stands: later ones are refused, except the duration limit
itself, which hangs up whatever else is under way, and the line going away, which ends
the call at once. A new reason is one more `EndReason` and its row in `_POLICY`.

Bookkeeping only (no I/O, no clock), like `gateway.watch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum


class EndReason(StrEnum):
    """Why a call ends; the value is a metric label and the transcript's `ended_by`."""

    # the model's tools
    END_CALL = "end_call"
    TRANSFER = "transfer_call"
    # the gateway's own moves (`gateway.watch.Move` values)
    SILENCE = "silence"
    MAX_DURATION = "max_duration"
    MAX_TOKENS = "max_tokens"
    MAX_COST = "max_cost"
    MAX_DAY_COST = "max_day_cost"
    DURATION_LIMIT = "max_duration_reached"
    # who answered an outbound call
    VOICEMAIL = "voicemail"
    MACHINE = "machine"
    FAX = "fax"
    # the line is gone (`CallOutcome` values)
    COMPLETED = "completed"
    HANGUP = "hangup"
    LIVE_FAILED = "live_failed"
    PROTOCOL_ERROR = "protocol_error"
    SHUTDOWN = "shutdown"
    # the call goes on on another replica (a drain with another one ready)
    HANDED_OFF = "handed_off"


class CallOutcome(StrEnum):
    """How a call ended (a metric label)."""

    COMPLETED = "completed"  # Twilio said stop
    HANGUP = "hangup"  # the stream closed without stop
    LIVE_FAILED = "live_failed"
    PROTOCOL_ERROR = "protocol_error"
    SHUTDOWN = "shutdown"
    ENDED_BY_GATEWAY = "ended_by_gateway"  # the gateway closed the stream (a REST request failed)
    HANDED_OFF = "handed_off"  # the stream closed so the call goes on on another replica


class Prelude(Enum):
    """What the caller hears before the call ends."""

    NOTHING = "nothing"  # it ends now
    LAST_WORDS = "last_words"  # what the model is saying (a tool's goodbye), to the end
    SAY = "say"  # the model finishes, then is told what to say, and that is heard
    SAY_NOW = "say_now"  # what plays is cut, the model is told what to say, that is heard


class Finish(Enum):
    """How the call is ended once the prelude is over."""

    HANG_UP = "hang_up"  # Twilio's REST hang-up (the stream is closed if it fails)
    TOOL = "tool"  # the tool's REST request (the stream is closed if it fails)
    NONE = "none"  # the line is gone already: the call only stops
    CLOSE = "close"  # the gateway closes the stream; Twilio asks the `<Connect action>`


@dataclass(frozen=True)
class Plan:
    """How the call ends for `reason`: `prelude` (with `say`, the instruction to the
    model, if any), then `finish`."""

    reason: EndReason
    prelude: Prelude
    finish: Finish
    say: str = ""


@dataclass(frozen=True)
class _Rule:
    prelude: Prelude
    finish: Finish
    overrides: bool = False  # taken even while the call is already ending


_LINE_GONE = _Rule(Prelude.NOTHING, Finish.NONE, overrides=True)
_POLICY: dict[EndReason, _Rule] = {
    EndReason.END_CALL: _Rule(Prelude.LAST_WORDS, Finish.TOOL),
    EndReason.TRANSFER: _Rule(Prelude.LAST_WORDS, Finish.TOOL),
    EndReason.SILENCE: _Rule(Prelude.SAY, Finish.HANG_UP),
    EndReason.MAX_DURATION: _Rule(Prelude.SAY, Finish.HANG_UP),
    EndReason.MAX_TOKENS: _Rule(Prelude.SAY, Finish.HANG_UP),
    EndReason.MAX_COST: _Rule(Prelude.SAY, Finish.HANG_UP),
    EndReason.MAX_DAY_COST: _Rule(Prelude.SAY, Finish.HANG_UP),
    EndReason.DURATION_LIMIT: _Rule(Prelude.NOTHING, Finish.HANG_UP, overrides=True),
    EndReason.VOICEMAIL: _Rule(Prelude.SAY_NOW, Finish.HANG_UP),
    EndReason.MACHINE: _Rule(Prelude.NOTHING, Finish.HANG_UP),
    EndReason.FAX: _Rule(Prelude.NOTHING, Finish.HANG_UP),
    EndReason.COMPLETED: _LINE_GONE,
    EndReason.HANGUP: _LINE_GONE,
    EndReason.LIVE_FAILED: _LINE_GONE,
    EndReason.PROTOCOL_ERROR: _LINE_GONE,
    EndReason.SHUTDOWN: _LINE_GONE,
    EndReason.HANDED_OFF: _Rule(Prelude.NOTHING, Finish.CLOSE),
}


def answered_by_kind(answered_by: str) -> str:
    """Twilio's AnsweredBy (`human`, `machine_end_beep`, `fax`, ...) as human, machine,
    fax or unknown (a metric label)."""
    value = answered_by.strip().lower()
    if value.startswith("machine"):
        return "machine"
    return value if value in ("human", "fax") else "unknown"


def answer_ending(kind: str, voicemail: str) -> EndReason | None:
    """How a call answered by `kind` ends: a machine gets the persona's `voicemail`
    message (or a hang-up when it has none), a fax a hang-up, a person the call as usual."""
    if kind == "machine":
        return EndReason.VOICEMAIL if voicemail else EndReason.MACHINE
    return EndReason.FAX if kind == "fax" else None


class Ending:
    """Whether, why and how the call is ending."""

    def __init__(self) -> None:
        self.reason: EndReason | None = None  # the first reason the call began to end for
        self.outcome: CallOutcome | None = None  # how it ended, once it has
        self.shutting_down = False  # the server is closing every stream

    @property
    def ended_by(self) -> EndReason | None:
        """The gateway's reason for ending the call, if the gateway began it."""
        reason = self.reason
        return reason if reason is not None and _POLICY[reason] is not _LINE_GONE else None

    def begin(self, reason: EndReason, say: str = "") -> Plan | None:
        """Begin ending for `reason` (`say`: what the model is told to say, for a reason
        whose prelude says something); None when the call is already ending for another."""
        rule = _POLICY[reason]
        if self.outcome is not None or (self.reason is not None and not rule.overrides):
            return None
        if self.reason is None:
            self.reason = reason
        if rule.finish is Finish.NONE:
            self.outcome = self._line_gone(reason)
        return Plan(reason, rule.prelude, rule.finish, say)

    def closed(self) -> None:
        """The gateway closed the stream (its REST request failed, or it had none)."""
        if self.outcome is None:
            handed_off = self.reason is EndReason.HANDED_OFF
            self.outcome = CallOutcome.HANDED_OFF if handed_off else CallOutcome.ENDED_BY_GATEWAY

    def _line_gone(self, reason: EndReason) -> CallOutcome:
        if reason is EndReason.HANGUP and self.shutting_down:
            return CallOutcome.SHUTDOWN  # the server closed the stream
        return CallOutcome(reason.value)
