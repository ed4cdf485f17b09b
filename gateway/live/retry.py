"""How long and how often a session tries to reconnect before it gives up.

Opening a connection after a failure waits a random time (full jitter, so calls cut by the
same outage do not return in step) up to ``backoff_initial_s``, doubled per attempt, at
most ``backoff_max_s``. Only a connection that delivered a valid message renews the
budget: a service that accepts the setup and then fails at once must not be retried
forever. The session gives up after ``reconnect_max_attempts`` attempts or
``reconnect_total_s`` after the first of them, naming the last error. A refused
resumption handle is not a failed attempt (the next one is a fresh session, at once).
"""

from __future__ import annotations

import random
from enum import StrEnum

from gateway.live.settings import LiveSettings


class FailureReason(StrEnum):
    """Why the conversation could not go on (a metric label)."""

    REFUSED = "refused"
    TIMED_OUT = "timed_out"
    GARBAGE = "garbage"
    UNREACHABLE = "unreachable"


class RetryBudget:
    """Attempts since the last connection that worked, and when to try again."""

    def __init__(self, settings: LiveSettings, rng: random.Random) -> None:
        self._settings = settings
        self._rng = rng
        self.attempts = 0  # opens since the last connection that delivered anything
        self._started: float | None = None  # the first of those opens
        self._last_error: tuple[FailureReason, str] | None = None
        self.retry_at: float | None = None  # open the next connection then

    def opening(self, now: float) -> None:
        """A connection is being opened now."""
        self.attempts += 1
        if self._started is None:
            self._started = now
        self.retry_at = None

    def delivered(self) -> None:
        """A connection delivered a valid message: it works, the budget is renewed."""
        self.attempts = 0
        self._started = None
        self._last_error = None

    def handle_refused(self) -> None:
        """The attempt failed only because its handle is gone: it does not count."""
        self.attempts -= 1

    def failed(self, reason: FailureReason, detail: str) -> None:
        """An attempt failed (the last error is named when the session gives up)."""
        self._last_error = (reason, detail)

    def exhausted(self, now: float) -> tuple[FailureReason, str] | None:
        """Why the session gives up now, or None while it may try again."""
        s = self._settings
        started = self._started if self._started is not None else now
        if self.attempts < s.reconnect_max_attempts and now - started <= s.reconnect_total_s:
            return None
        reason, detail = self._last_error or (FailureReason.UNREACHABLE, "no connection")
        return reason, (
            f"live service unreachable: {self.attempts} attempts in "
            f"{now - started:.1f} s (last error: {reason.value}, {detail or 'none'})"
        )

    def back_off(self, now: float) -> None:
        """Try again after a random wait, growing with the attempts."""
        s = self._settings
        delay = min(s.backoff_initial_s * 2 ** (self.attempts - 1), s.backoff_max_s)
        self.retry_at = now + self._rng.uniform(0, delay)

    def due(self, now: float) -> bool:
        return self.retry_at is not None and now >= self.retry_at

    def cancel(self) -> None:
        self.retry_at = None
