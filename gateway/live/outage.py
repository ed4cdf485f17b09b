"""The reset in progress, and the resets so far, as the call's events report them.

From the moment the caller's audio loses its connection (or a switch begins) until a
connection takes over, the session is in an outage: its cause (goAway, abrupt, a refused
handle) and its start give the `Resumed` event's cause and gap, and each outage counts
once, by cause, when it ends.
"""

from __future__ import annotations

from gateway.live.events import ResetCause


class Outage:
    """Why the session is between connections, since when, and the resets counted."""

    def __init__(self) -> None:
        self.cause: ResetCause | None = None  # why a connection is being replaced
        self.lost_at: float | None = None  # when the caller's audio lost its connection
        self.handle_refused = False  # the handle was refused on the way: a fresh session
        self.counts: dict[ResetCause, int] = dict.fromkeys(ResetCause, 0)

    def lost(self, now: float, cause: ResetCause) -> None:
        """The caller's audio has no connection (from the first loss on)."""
        if self.lost_at is None:
            self.lost_at = now
        self.cause = cause

    def gap(self, now: float) -> float:
        return now - self.lost_at if self.lost_at is not None else 0.0

    def counted(self, cause: ResetCause) -> ResetCause:
        """A connection opened for `cause` took over: the reset's cause, counted."""
        if self.handle_refused:
            cause = ResetCause.REFUSED
        self.counts[cause] += 1
        return cause

    def over(self) -> None:
        """A connection took over."""
        self.cause = None
        self.lost_at = None
        self.handle_refused = False
