"""What compression took from the model's context, carried back in its system instruction.

Sliding-window compression (``contextWindowCompression``) drops whole turns from the start of
a session's context once it passes the trigger, and keeps the system instruction (the SDK's
``SlidingWindow`` docs, ``/work/shared/live-models.md`` §1.7); a long call's model then
forgets what the caller said first: their name, their order. Where the model takes a
mid-session system-instruction update (``Profile.context_update``: Vertex AI's 3.8 [VSESS]),
the gateway sends the persona's instruction with a bounded section of the transcribed turns
that were dropped, once per compression that dropped more.

Nothing tells the client what was dropped; the usage reports do. Each ``promptTokenCount``
is the whole context the model read for its turn (``gateway.testing.billing``), so a prompt
smaller than the context the previous report ended with (its prompt plus its reply) means
compression dropped what that context and the new input held beyond it. The new input is
not reported apart: it is taken to be as long as the previous report's (the audio streamed
between two turns, alike from turn to turn), so a turn may be carried one compression late
or early, and an early one is only said twice. Each report marks how many of the call's
turns had begun and where (in tokens, as if nothing had been dropped) the context then
ended; the turns of the marks within the system instruction plus what was dropped (give or
take an eighth of a turn's input: the estimate's rounding, far less than a turn) are the
ones the model lost. A fresh session (a refused handle) starts over: its setup has the
persona's instruction and its brief the recent turns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from gateway.live.history import History

ESSENTIALS_MAX_CHARS = 2000  # transcribed text carried (the newest of the dropped turns)
HEADING = "Earlier in this call (no longer in your context):"
_SPEAKERS = {"user": "Caller", "model": "You"}


def text_tokens(text: str) -> int:
    """Tokens of a text by the rule of thumb (four characters a token)."""
    return math.ceil(len(text) / 4)


def section(turns: Sequence[tuple[str, str]], limit: int = ESSENTIALS_MAX_CHARS) -> str:
    """The dropped turns as lines, the newest that fit in `limit` characters, oldest first
    (a single turn longer than that keeps its end)."""
    lines: list[str] = []
    total = 0
    for role, text in reversed(turns):
        line = f"{_SPEAKERS.get(role, role)}: {text.strip()}"
        if total + len(line) + 1 > limit:
            if not lines:
                lines.append(line[-limit:])
            break
        lines.append(line)
        total += len(line) + 1
    return "\n".join(reversed(lines))


class Essentials:
    """One session's dropped turns, from its usage reports; what to send when more went."""

    def __init__(self, instruction: str, limit: int = ESSENTIALS_MAX_CHARS) -> None:
        self.instruction = instruction
        self.limit = limit
        self.fresh()

    def fresh(self) -> None:
        """A new session: nothing dropped, nothing carried."""
        self._system = text_tokens(self.instruction)  # at the context's start, never dropped
        self._sent = self._system  # the instruction the model has now
        self._extra = 0  # what the instruction grew by since the last report
        self._end = 0  # where the context ended after the last report, nothing dropped
        self._dropped = 0  # tokens compression dropped so far
        self._input = 0  # the input the last report without compression brought
        self._marks: list[tuple[int, int]] = []  # (turns begun, context end) per report
        self.carried = 0  # turns (numbered from the call's start) the model was given back
        self.last: str | None = None  # the instruction last sent

    def report(self, prompt: int, response: int, turns: int) -> None:
        """A ``usageMetadata``: its prompt and response tokens; `turns` begun so far."""
        held = self._end - self._dropped
        if prompt >= held:
            self._input = max(0, prompt - held - self._extra)
            self._end = self._dropped + prompt
        else:  # compressed: it held `held`, then the input and the instruction's growth
            self._end += self._input + self._extra
            self._dropped = max(self._dropped, self._end - prompt)
        self._extra = 0
        self._end += response
        self._marks.append((turns, self._end))

    @property
    def lost(self) -> int:
        """Turns from the call's start the model no longer holds, by the reports."""
        reach = self._reach
        return max((turns for turns, end in self._marks if end <= reach), default=0)

    @property
    def _reach(self) -> int:
        return self._system + self._dropped + self._input // 8

    def due(self, history: History) -> str | None:
        """The system instruction to send now (None: nothing more was dropped)."""
        lost = self.lost
        if lost <= self.carried:
            return None
        self.carried = lost
        reach = self._reach
        self._marks = [mark for mark in self._marks if mark[1] > reach]
        text = section(history.since(0, lost), self.limit)
        if not text:
            return None
        instruction = f"{self.instruction}\n\n{HEADING}\n{text}"
        tokens = text_tokens(instruction)
        self._extra += tokens - self._sent
        self._sent = tokens
        self.last = instruction
        return instruction
