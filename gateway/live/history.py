"""The conversation's transcribed turns, to brief a fresh session.

When the service refuses a resumption handle, the call goes on in a fresh session that
knows nothing of it; the turns heard so far, bounded (the newest ``HISTORY_CHARS``), are
given to it as prior turns before the replayed input.
"""

from __future__ import annotations

HISTORY_CHARS = 4000  # conversation text given to a fresh session
TURNS_KEPT = 64


class History:
    """Transcribed turns, a role's consecutive pieces joined."""

    def __init__(self) -> None:
        self.turns: list[tuple[str, str]] = []
        self.added = 0  # turns begun since the call's start (`turns` holds the newest)

    def add(self, role: str, text: str) -> None:
        if self.turns and self.turns[-1][0] == role:
            self.turns[-1] = (role, self.turns[-1][1] + text)
        else:
            self.turns.append((role, text))
            self.added += 1
        if len(self.turns) > TURNS_KEPT:
            del self.turns[:-TURNS_KEPT]

    def since(self, first: int, end: int) -> list[tuple[str, str]]:
        """Turns `first` to `end` - 1, numbered from the call's start, that are still kept."""
        base = self.added - len(self.turns)
        return self.turns[max(0, first - base) : max(0, end - base)]

    def recent(self, limit: int = HISTORY_CHARS) -> tuple[tuple[str, str], ...]:
        """The newest turns whose text fits in `limit` characters, oldest first."""
        kept: list[tuple[str, str]] = []
        total = 0
        for role, text in reversed(self.turns):
            total += len(text)
            if total > limit:
                break
            kept.append((role, text))
        return tuple(reversed(kept))
