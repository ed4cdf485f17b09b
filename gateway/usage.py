"""What a call cost: the Live API's token counts summed per call, and their price.

The service reports `usageMetadata` for each model turn (`gateway.live.events.Usage`):
prompt tokens (what the model read: the caller's audio, text turns, the context it kept)
and response tokens (what it said), each broken down by modality. Each report is a
snapshot of one turn, the whole context it read included: the bill is the sum of every
report ([D173248]: only that reading matched a user's bill), so a call adds each up once.
Tokens the service reports without a breakdown count as `text`; thinking tokens are billed
as output text ("output price includes thinking tokens" [MJ]) and tool-use prompt tokens as
input text. Whether `totalTokenCount` includes thoughts is not settled (the SDK says it
does; a 3.8 report showed it without [D188765]): the call's total counts each token once
either way. Vertex AI reports output as `candidatesTokenCount`, which the SDK reads as
the response count: one shape here.

Prices (USD per million tokens, by `prompt_audio`, `response_text`, ...) come from the
model's sheet (`MODEL_PRICES`), kind by kind overridden by `TOKEN_PRICES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.live.events import Usage

MODALITIES = frozenset({"audio", "text", "image", "video", "document"})

#: 3.8, 3.8 extended thinking and 3.1 share one sheet (live-models.md §6: [MJ][VORTEX]
#: [IDPRICE]; 3.1's per-minute prices of Apr 2026 [D140340] are the same sheet). 2.5 and
#: Vertex AI prices were not found: set TOKEN_PRICES for them.
_SHEET_38 = {
    "prompt_audio": 3.0,
    "prompt_text": 0.75,
    "response_audio": 12.0,
    "response_text": 4.5,
}
MODEL_PRICES: Mapping[str, Mapping[str, float]] = {
    "gemini-3.8-live": _SHEET_38,
    "gemini-3.8-live-extended-thinking": _SHEET_38,
    "gemini-3.1-flash-live-preview": _SHEET_38,
}


def prices_for(model: str, override: Mapping[str, float]) -> dict[str, float]:
    """The model's price sheet (none if unknown) with the operator's prices over it."""
    return {**MODEL_PRICES.get(model.rsplit("/", 1)[-1], {}), **override}


def _modality(name: str) -> str:
    return name if name in MODALITIES else "text"


@dataclass
class CallUsage:
    """Tokens of one call so far."""

    prompt_tokens: int = 0
    response_tokens: int = 0
    total_tokens: int = 0
    turns: int = 0  # usage reports received
    by_kind: dict[str, int] = field(default_factory=dict)  # "prompt_audio" -> tokens
    prices: Mapping[str, float] = field(default_factory=dict)  # USD per million, by kind

    def add(self, usage: Usage) -> dict[str, int]:
        """Count one report; returns its tokens by kind (for the metrics)."""
        self.turns += 1
        self.prompt_tokens += usage.prompt_tokens
        self.response_tokens += usage.response_tokens
        billed = usage.prompt_tokens + usage.response_tokens
        billed += usage.thoughts_tokens + usage.tool_prompt_tokens
        self.total_tokens += max(usage.total_tokens, billed)
        kinds: dict[str, int] = {}
        for side, total, details in (
            ("prompt", usage.prompt_tokens, usage.prompt_by_modality),
            ("response", usage.response_tokens, usage.response_by_modality),
        ):
            itemised = 0
            for modality, tokens in details:
                key = f"{side}_{_modality(modality)}"
                kinds[key] = kinds.get(key, 0) + tokens
                itemised += tokens
            if total > itemised:  # no breakdown, or a partial one
                key = f"{side}_text"
                kinds[key] = kinds.get(key, 0) + total - itemised
        for key, extra in (
            ("response_text", usage.thoughts_tokens),
            ("prompt_text", usage.tool_prompt_tokens),
        ):
            if extra:
                kinds[key] = kinds.get(key, 0) + extra
        for key, tokens in kinds.items():
            self.by_kind[key] = self.by_kind.get(key, 0) + tokens
        return kinds

    def counts(self) -> dict[str, int]:
        """The counts so far, flat (the totals, `turns`, and each kind): what a call handed
        to another replica carries on with (:meth:`carry_on`)."""
        return {
            **self.by_kind,
            "prompt_tokens": self.prompt_tokens,
            "response_tokens": self.response_tokens,
            "total_tokens": self.total_tokens,
            "turns": self.turns,
        }

    def carry_on(self, counts: Mapping[str, int]) -> None:
        """Start from what :meth:`counts` gave on the replica the call was handed off by."""
        totals = ("prompt_tokens", "response_tokens", "total_tokens", "turns")
        self.prompt_tokens, self.response_tokens, self.total_tokens, self.turns = (
            counts.get(name, 0) for name in totals
        )
        self.by_kind = {kind: n for kind, n in counts.items() if kind not in totals}

    def cost_usd(self) -> float | None:
        """The price of the tokens so far; None without prices."""
        prices = self.prices
        if not prices:
            return None
        return sum(tokens * prices.get(kind, 0.0) for kind, tokens in self.by_kind.items()) / 1e6

    def summary(self) -> dict[str, object]:
        """For the transcript's `end` line."""
        out: dict[str, object] = {
            "prompt_tokens": self.prompt_tokens,
            "response_tokens": self.response_tokens,
            "total_tokens": self.total_tokens,
            "tokens_by_kind": dict(sorted(self.by_kind.items())),
        }
        cost = self.cost_usd()
        if cost is not None:
            out["cost_usd"] = round(cost, 6)
        return out
