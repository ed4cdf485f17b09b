"""What a Live session tells its owner: typed events, no SDK types leak out."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal


class TurnState(StrEnum):
    """Who holds the floor, as far as the model's messages tell."""

    IDLE = "idle"
    MODEL_SPEAKING = "model_speaking"
    CALLER_SPEAKING = "caller_speaking"


class ResetCause(StrEnum):
    """Why the session moved to a new connection."""

    GOAWAY = "goaway"
    ABRUPT = "abrupt"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class ModelAudio:
    """A chunk of the model's reply: 24 kHz 16-bit PCM."""

    pcm: bytes
    received_at: float


@dataclass(frozen=True, slots=True)
class Interrupted:
    """The caller talked over the model; whatever is queued of the reply is stale."""


@dataclass(frozen=True, slots=True)
class GenerationComplete:
    """The model has produced the whole reply (it may still be playing)."""


@dataclass(frozen=True, slots=True)
class TurnComplete:
    """The model's turn is over; the floor is the caller's."""


@dataclass(frozen=True, slots=True)
class Transcript:
    """A piece of transcription of either side."""

    role: Literal["caller", "model"]
    text: str


@dataclass(frozen=True, slots=True)
class ReplyAbandoned:
    """A reply in progress was lost with its connection; the model will answer again."""

    cause: ResetCause


@dataclass(frozen=True, slots=True)
class RepeatSkipped:
    """The resumed model began a reply the caller had already heard in full; it is not played.

    `text` is what the caller heard the first time; `held_s` the audio held while judging.
    """

    text: str
    held_s: float


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The service announced the end of the current connection."""

    time_left_s: float


@dataclass(frozen=True, slots=True)
class Resumed:
    """The session continues on a new connection."""

    cause: ResetCause
    gap_s: float  # how long caller audio had no working connection
    replayed_s: float  # caller audio sent again into the new connection
    attempts: int
    fresh: bool  # True when the handle was refused and a new session carries the call
    mode: str = ""  # goAway switches: "make_before_break" or "break_before_make"
    overlap_s: float = 0.0  # of the replayed audio, how much the handle may have held already
    handle: str | None = None  # the handle it resumed (None: a fresh session)
    replayed_from: int = 0  # bytes of caller audio (16 kHz PCM) the session had before the replay


@dataclass(frozen=True, slots=True)
class AudioDropped:
    """Caller audio that fell out of the bounded replay buffer undelivered."""

    seconds: float


@dataclass(frozen=True, slots=True)
class ToolCall:
    """The model asks the gateway to run a function."""

    call_id: str
    name: str
    args: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens the service counted for a model turn (its `usageMetadata`), as billed.

    The by-modality pairs are (modality in lower case, e.g. "audio" or "text", tokens);
    empty when the service gave no breakdown.
    """

    prompt_tokens: int
    response_tokens: int
    total_tokens: int
    prompt_by_modality: tuple[tuple[str, int], ...] = ()
    response_by_modality: tuple[tuple[str, int], ...] = ()
    thoughts_tokens: int = 0  # billed as output; 3.8's total was seen without them [D188765]
    tool_prompt_tokens: int = 0  # tool-use prompt tokens, billed as input


LiveEvent = (
    ModelAudio
    | Interrupted
    | GenerationComplete
    | TurnComplete
    | Transcript
    | ReplyAbandoned
    | RepeatSkipped
    | GoAwayReceived
    | Resumed
    | AudioDropped
    | ToolCall
    | Usage
)
