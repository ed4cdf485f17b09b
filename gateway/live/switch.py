"""When and how a session moves to a new connection after the service's goAway.

A goAway says the connection ends in ``timeLeft``. The move is made at a clean moment (the
model not speaking, a handle issued since it last spoke, the caller in a pause), so nobody
hears a seam, and at the latest ``goaway_margin_s`` before the end, whatever is going on.
Make before break (the new connection opened while the old one carries the call) unless
the service refused a second connection once: then break before make for the rest of the
call.
"""

from __future__ import annotations

from enum import StrEnum


class SwitchMode(StrEnum):
    """How a goAway switch is made (a metric label)."""

    MAKE_BEFORE_BREAK = "make_before_break"  # open the next one while the old one carries audio
    BREAK_BEFORE_MAKE = "break_before_make"  # close the old one at a pause, then open


class GoAwaySwitch:
    """The pending goAway switch's deadline, and how switches are made."""

    def __init__(self, margin_s: float) -> None:
        self._margin_s = margin_s
        self.deadline: float | None = None  # switch by then at the latest
        self.forced = False  # the latest switch was made at its deadline, not at a pause
        self.mode = SwitchMode.MAKE_BEFORE_BREAK
        self.handle_after_reply = True  # a handle came since the model last spoke

    def announced(self, ends_at: float, now: float) -> None:
        """The active connection ends at `ends_at`."""
        self.deadline = max(now, ends_at - self._margin_s)
        self.forced = False

    def due(self, now: float, clean: bool) -> bool:
        """Switch now? `clean`: nobody would hear the seam."""
        return self.deadline is not None and (clean or now >= self.deadline)

    def made(self, clean: bool) -> None:
        self.forced = not clean
        self.deadline = None

    def cancel(self) -> None:
        self.deadline = None

    def second_connection_refused(self) -> None:
        self.mode = SwitchMode.BREAK_BEFORE_MAKE
