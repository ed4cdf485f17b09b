"""Who is speaking: the caller, by the energy of their audio, and the model, by its reply.

The session machine needs it for its timing, not for the conversation: a goAway switch
waits for a pause in the caller's speech (speech within ``caller_pause_s`` counts as still
speaking, so the gaps between words are no pause), a ready replacement takes over at once
when the caller talks over the old reply, and a caller who spoke after the model's latest
reply began is still waiting for an answer.
"""

from __future__ import annotations

from gateway.live.events import TurnState

NEVER = -1e9


class Turns:
    """When the caller last spoke and the model's latest reply began; the turn state."""

    def __init__(self, pause_s: float) -> None:
        self._pause_s = pause_s
        self.state = TurnState.IDLE
        self.caller_spoke_at = NEVER  # the latest caller audio with speech in it
        self.reply_began_at = NEVER  # when the model's latest reply began

    def caller_spoke(self, now: float) -> None:
        self.caller_spoke_at = now

    def caller_speaking(self, now: float) -> bool:
        return now - self.caller_spoke_at < self._pause_s

    def caller_pause_at(self) -> float | None:
        """When the caller's latest speech turns into a pause (None: never spoke)."""
        return self.caller_spoke_at + self._pause_s if self.caller_spoke_at > NEVER else None

    @property
    def unanswered(self) -> bool:
        """The caller spoke after the model's latest reply began."""
        return self.caller_spoke_at > self.reply_began_at

    def reply_began(self, now: float) -> None:
        self.reply_began_at = now
        self.state = TurnState.MODEL_SPEAKING

    def interrupted(self) -> None:
        """The caller talked over the model's reply."""
        self.state = TurnState.CALLER_SPEAKING

    def idle(self) -> None:
        self.state = TurnState.IDLE
