"""What the Live service bills a session for: the emulator's billing model, a profile per model.

Nobody here can call the real service. Each rule below is a public report, named by its key
in /work/shared/live-models.md (§0 resolves the keys; §6 and §11 items 11-13 hold the
conflicts), and each is a knob of :class:`BillingProfile`, so every reading can be played:

* **Audio is billed by its duration, silence like speech.** "Periods of silence ... are
  indeed billed at the same rate as periods when a user is actively speaking" (Google Cloud
  Billing's answer quoted in [D92653]). Rates (``audio_in_per_s``, ``audio_out_per_s``):
  32 or 25 tokens a second are both claimed [D92653]; the per-minute equivalents of 3.8's
  price sheet ($0.005/min of input at $3/M, $0.018/min of output at $12/M) imply ~27.8 in
  and 25 out [MJ], the defaults here.
* **Every model turn bills the whole context again.** Each turn ends with a
  ``usageMetadata`` whose ``promptTokenCount`` is everything the model read for it: the
  system instruction, every earlier turn's caller audio, its own earlier replies, text turns,
  and the input since the last turn. It grows through the call. "Re-billing applies to all
  tokens, including raw audio from previous turns ... on every single turn" (a Google docs
  author, [D140340]); of three readings of the per-turn reports, only "sum every snapshot"
  matched a user's bill, within ~3 % [D173248]. ``rebill_context=False`` plays the other
  reading: a turn bills only its new input.
* **Replies stay in the context as audio** at ``audio_out_per_s`` tokens a second, re-read
  at the input price ([D140340]: past audio is kept as audio "to preserve tone"; that the
  model's own replies are re-read the same way is assumed: not found).
* **Compression trims what is billed.** With ``contextWindowCompression{triggerTokens,
  slidingWindow{targetTokens}}``, once the context passes ``triggerTokens`` whole turns are
  dropped from its start until it holds at most ``targetTokens``; the system instruction
  stays (the SDK's ``SlidingWindow`` docs; ``targetTokens`` defaults to half the trigger,
  the trigger to 80 % of the 131,072-token window). That later turns bill the trimmed
  context was asked in [D140340] (answer not found): assumed, as the report is the bill.
* **An interrupted reply** is billed for its share of the reply that went out, with its
  turn's prompt, on the ``interrupted`` message (not found publicly: assumed).
* **Audio after the last turn** is read for no reply and no report covers it: not billed
  here (whether the real service bills it at the session's end: not found).
* **Text**: a token per 4 characters, rounded up (Google's rule of thumb for Gemini).
* **Prices** (USD per million tokens, by the gateway's ``TOKEN_PRICES`` kinds): 3.8,
  3.8 extended thinking and 3.1 share one sheet, $3 audio in, $12 audio out, $0.75 text in,
  $4.50 text out [MJ][VORTEX][IDPRICE][D140340]; 2.5 and Vertex prices were not found: the
  same sheet stands in.

Reports have the Gemini API's shape (``responseTokenCount``, ``*TokensDetails`` by
modality); the emulator's Vertex path renames them. :class:`Bill` sums what a session was
sent, the way [D173248] found the real bill adds up.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

BYTES_PER_SECOND = 16_000 * 2  # the caller audio the service takes: 16 kHz, 16-bit
CONTEXT_WINDOW = 131_072  # input tokens of every Gemini API Live model ([G38][G31][G25])
PRICES_38: Mapping[str, float] = {
    "prompt_audio": 3.0,
    "response_audio": 12.0,
    "prompt_text": 0.75,
    "response_text": 4.5,
}


@dataclass(frozen=True)
class BillingProfile:
    """How one model's sessions are billed (the module docstring says what each rests on)."""

    audio_in_per_s: float = 1667 / 60  # ~27.8 [MJ]; 25 or 32 [D92653]
    audio_out_per_s: float = 25.0  # [MJ][D92653]
    rebill_context: bool = True  # each turn bills the whole context [D140340][D173248]
    prices: Mapping[str, float] = field(default_factory=lambda: dict(PRICES_38))

    def audio_in_tokens(self, audio_bytes: int) -> int:
        """Tokens of the first ``audio_bytes`` of a session's caller audio (cumulative, so
        that rounding never drifts over a long call)."""
        return round(audio_bytes / BYTES_PER_SECOND * self.audio_in_per_s)

    def audio_out_tokens(self, seconds: float) -> int:
        return round(seconds * self.audio_out_per_s)

    def cost_usd(self, tokens_by_kind: Mapping[str, int]) -> float:
        return sum(n * self.prices.get(kind, 0.0) for kind, n in tokens_by_kind.items()) / 1e6


DEFAULT_PROFILE = BillingProfile()
#: By model id. The 2.5 native-audio models are said to bill 32 tokens a second [D92653].
PROFILES: dict[str, BillingProfile] = {
    "gemini-3.8-live": DEFAULT_PROFILE,
    "gemini-3.8-live-extended-thinking": DEFAULT_PROFILE,
    "gemini-3.1-flash-live-preview": DEFAULT_PROFILE,
    "gemini-2.5-flash-native-audio-preview-12-2025": BillingProfile(audio_in_per_s=32.0),
    "gemini-2.5-flash-native-audio-preview-09-2025": BillingProfile(audio_in_per_s=32.0),
    "gemini-live-2.5-flash-native-audio": BillingProfile(audio_in_per_s=32.0),
}


def profile_for(model: str, profiles: Mapping[str, BillingProfile] | None = None) -> BillingProfile:
    """The profile of a setup's ``model`` (``models/X`` or a Vertex resource name)."""
    name = model.rsplit("/", 1)[-1]
    return (PROFILES if profiles is None else profiles).get(name, DEFAULT_PROFILE)


def text_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


@dataclass(frozen=True)
class Turn:
    """One turn the context holds: the input before it and the reply it got, in tokens."""

    audio_in: int = 0
    text: int = 0
    audio_out: int = 0

    @property
    def tokens(self) -> int:
        return self.audio_in + self.text + self.audio_out


@dataclass(frozen=True)
class Context:
    """What a session's model holds, in tokens. Immutable: a resumption handle keeps the
    value it saw, and a resumed session goes on from it."""

    system: int = 0  # the setup's system instruction, never trimmed
    compression: tuple[int, int] | None = None  # (triggerTokens, targetTokens)
    turns: tuple[Turn, ...] = ()
    audio_bytes: int = 0  # the session's caller audio up to here is in `turns`
    text_entries: int = 0  # the session's text history up to here is in `turns`
    trimmed: int = 0  # tokens compression dropped so far

    @property
    def tokens(self) -> int:
        return self.system + sum(t.tokens for t in self.turns)


EMPTY = Context()


def start(setup: Mapping[str, Any]) -> Context:
    """A new session's context, from its (camelCase) setup."""
    instruction = setup.get("systemInstruction")
    parts = instruction.get("parts", []) if isinstance(instruction, dict) else []
    system = sum(text_tokens(str(p.get("text", ""))) for p in parts if isinstance(p, dict))
    cwc = setup.get("contextWindowCompression")
    compression = None
    if isinstance(cwc, dict):
        trigger = int(cwc.get("triggerTokens") or 0.8 * CONTEXT_WINDOW)
        window = cwc.get("slidingWindow")
        target = window.get("targetTokens") if isinstance(window, dict) else None
        compression = (trigger, int(target or trigger // 2))
    return Context(system=system, compression=compression)


def _compress(context: Context, pending: Turn) -> Context:
    """Drop whole turns from the start while the context (with the turn being read) is past
    the trigger, down to the target."""
    if context.compression is None:
        return context
    trigger, target = context.compression
    held = list(context.turns)
    total = context.tokens + pending.tokens
    if total <= trigger:
        return context
    dropped = 0
    while held and total - dropped > target:
        dropped += held.pop(0).tokens
    return replace(context, turns=tuple(held), trimmed=context.trimmed + dropped)


def bill_turn(
    profile: BillingProfile,
    context: Context,
    *,
    audio_bytes: int,
    history: Iterable[str],
    history_len: int,
    reply_s: float,
) -> tuple[Context, dict[str, Any]]:
    """One model turn: the context after it and the ``usageMetadata`` that reports it.

    ``audio_bytes``: the session's caller audio so far; ``history``: the text entries added
    since ``context.text_entries`` (``history_len`` entries in all now); ``reply_s``: the
    reply's audio that was generated (all of it, or its share before an interruption).
    """
    pending = Turn(
        audio_in=profile.audio_in_tokens(audio_bytes)
        - profile.audio_in_tokens(context.audio_bytes),
        text=sum(text_tokens(t) for t in history),
    )
    context = _compress(context, pending)
    read = (*context.turns, pending) if profile.rebill_context else (pending,)
    prompt_audio = sum(t.audio_in + t.audio_out for t in read)
    prompt_text = sum(t.text for t in read) + (
        context.system if profile.rebill_context or not context.turns else 0
    )
    response = profile.audio_out_tokens(reply_s)
    usage = {
        "promptTokenCount": prompt_audio + prompt_text,
        "responseTokenCount": response,
        "totalTokenCount": prompt_audio + prompt_text + response,
        "promptTokensDetails": [
            {"modality": "AUDIO", "tokenCount": prompt_audio},
            {"modality": "TEXT", "tokenCount": prompt_text},
        ],
        "responseTokensDetails": [{"modality": "AUDIO", "tokenCount": response}],
    }
    after = replace(
        context,
        turns=(*context.turns, replace(pending, audio_out=response)),
        audio_bytes=audio_bytes,
        text_entries=history_len,
    )
    return after, usage


_KIND = {"AUDIO": "audio", "TEXT": "text"}


@dataclass
class Bill:
    """What a session was billed: the sum of every report it was sent [D173248]."""

    profile: BillingProfile = DEFAULT_PROFILE
    reports: int = 0
    tokens: dict[str, int] = field(default_factory=dict)  # "prompt_audio" -> tokens

    def add(self, usage: Mapping[str, Any]) -> None:
        self.reports += 1
        # Output tokens are `response*` on the Gemini API, `candidates*` on Vertex.
        for side, total_key, details_key in (
            ("prompt", "promptTokenCount", "promptTokensDetails"),
            ("response", "responseTokenCount", "responseTokensDetails"),
            ("response", "candidatesTokenCount", "candidatesTokensDetails"),
        ):
            itemised = 0
            details = usage.get(details_key) or []
            for item in details:
                kind = f"{side}_{_KIND.get(str(item.get('modality')), 'text')}"
                self.tokens[kind] = self.tokens.get(kind, 0) + int(item.get("tokenCount", 0))
                itemised += int(item.get("tokenCount", 0))
            total = int(usage.get(total_key) or 0)
            if total > itemised:
                kind = f"{side}_text"
                self.tokens[kind] = self.tokens.get(kind, 0) + total - itemised

    @property
    def total(self) -> int:
        return sum(self.tokens.values())

    @property
    def cost_usd(self) -> float:
        return self.profile.cost_usd(self.tokens)

    def summary(self) -> dict[str, Any]:
        return {
            "reports": self.reports,
            "tokens": dict(sorted(self.tokens.items())),
            "total": self.total,
            "cost_usd": self.cost_usd,
        }
