"""The caller's input kept for replay: numbered, bounded, forgotten once nothing can need it.

A reset resumes the model from a handle that holds the caller's input up to some number
(the handle's base); everything after it must be written again to the new connection.
So every input is numbered (``seq``) and kept until no connection can resume from below
it (`forget_upto`). The log is bounded (``replay_limit_s`` of audio): audio pushed out
before any connection had it is lost at once (the caller must be told: `add` returns its
seconds); audio pushed out after it was written is lost only if a reset later resumes
from below it (`lost_after`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

INPUT_RATE = 16000
BYTES_PER_SECOND = INPUT_RATE * 2


@dataclass(slots=True)
class Input:
    """One message of caller input, numbered so handles can be placed exactly."""

    seq: int
    audio: bytes | None = None
    text: str | None = None
    turn_complete: bool = True
    received_at: float = 0.0
    offset: int = 0  # bytes of caller audio before it (since the session began)

    @property
    def seconds(self) -> float:
        return len(self.audio) / BYTES_PER_SECOND if self.audio is not None else 0.0


class ReplayLog:
    """Numbered caller input since the oldest base any connection may resume from."""

    def __init__(self, limit_s: float) -> None:
        self.seq = 0  # the newest input's number
        self._items: deque[Input] = deque()
        self._bytes = 0
        self.total_bytes = 0  # caller audio ever added
        self._limit_bytes = int(limit_s * BYTES_PER_SECOND)
        self._unprotected: deque[tuple[int, float]] = deque()  # (seq, seconds) pushed out
        self.dropped_s = 0.0  # audio that never reached the model, counted when known

    def __iter__(self) -> Iterator[Input]:
        return iter(self._items)

    def add(self, item: Input, written_upto: int) -> list[float]:
        """Number `item` and keep it. Inputs up to `written_upto` reached a connection.

        Returns the seconds of each piece of audio pushed out before it was written: it
        can never reach the model.
        """
        self.seq += 1
        item.seq = self.seq
        item.offset = self.total_bytes
        self._items.append(item)
        dropped: list[float] = []
        if item.audio is None:
            return dropped
        self._bytes += len(item.audio)
        self.total_bytes += len(item.audio)
        while self._bytes > self._limit_bytes and self._items:
            old = self._items.popleft()
            if old.audio is None:
                continue
            self._bytes -= len(old.audio)
            if old.seq <= written_upto:
                # Delivered, but no trusted handle covers it yet: lost only if a reset
                # resumes from below it.
                self._unprotected.append((old.seq, old.seconds))
            else:
                dropped.append(old.seconds)
                self.dropped_s += old.seconds
        return dropped

    def after(self, base: int) -> tuple[Input, ...]:
        """What a connection resumed from `base` lacks, in order."""
        return tuple(item for item in self._items if item.seq > base)

    def seconds_between(self, base: int, newest: int) -> float:
        """Audio seconds kept after `base` up to `newest`."""
        return sum(item.seconds for item in self._items if base < item.seq <= newest)

    def lost_after(self, base: int) -> float | None:
        """Seconds of written audio pushed out above `base` (None: none): a resume from
        `base` lacks them for good. Counted once."""
        lost = [s for q, s in self._unprotected if q > base]
        if not lost:
            return None
        self._unprotected.clear()
        self.dropped_s += sum(lost)
        return sum(lost)

    def forget_upto(self, floor: int) -> None:
        """No connection will resume from below `floor`: drop what it covers."""
        items = self._items
        while items and items[0].seq <= floor:
            old = items.popleft()
            if old.audio is not None:
                self._bytes -= len(old.audio)
        while self._unprotected and self._unprotected[0][0] <= floor:
            self._unprotected.popleft()

    def check(self) -> None:
        if self._items:
            assert self._items[0].seq > 0
        assert self._bytes >= 0
