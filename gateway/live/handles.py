"""Resumption handles: which caller input a handle holds, and the one a reset resumes from.

A handle says nothing of which input it holds, yet a reset must replay exactly what it
lacks: too little loses the caller's words, too much makes the model hear them twice.

* **Placement** (`RoundTripPlacement`): input written to a connection at least one guard
  interval before the handle arrived was in the service when it issued the handle; input
  still in flight may not be. Whatever the split between the two directions, input written
  one round trip before the handle arrived had reached the service; the guard is 1.5 round
  trips plus ``GUARD_MARGIN_S`` (for jitter). At worst that much input is sent twice at a
  reset. Both times are the socket's, not the reader's or writer's: a handle arrived when
  its message reached the connection (`gateway.live.sdk.TimedSocket`, less the loop's lag
  around then: `gateway.live.looplag`), however late a busy event loop reads it; input was
  written when the transport had handed it on to the kernel. The round trip: the least of
  the latest ``RTT_SAMPLES`` samples, the connection's setup and its prompt pongs. Each
  bounds the data path's round trip from above (a lagging event loop or the service's own
  work only add to it), so one sample taken while the loop lagged neither widens the guard
  nor, being the least, narrows it below the path's. The service's pongs have been seen 8-30
  s late, so the setup is timed too (it went up and came down as input and handles do, with
  the service's setup work on top). Until a sample beats it, ``DEFAULT_RTT_S`` is assumed.
  Writes are kept for a handle read up to ``READ_LAG_S`` after it arrived; one read later
  places no more than the last.
* **Exact placement** (`IndexPlacement`, on Vertex AI): with `transparent` resumption each
  handle names the last client message its state holds (`lastConsumedClientMessageIndex`);
  counting the messages written to the connection, it holds exactly the input up to that
  one: nothing is replayed twice, nothing missing. Without an index it places as above.
* **The held handle** (`HeldHandle`): the newest trusted handle, the input number it covers
  (its base) and what it may hold beyond that (overlap). A later handle of the same lineage
  covers at least as much; one that places no more input than the one held but leaves more
  in doubt (a handle right after a replay) is not taken: the one held says as much, with
  less sent twice.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

GUARD_MARGIN_S = 0.005  # added to 1.5 round trips when placing a handle
DEFAULT_RTT_S = 0.15  # assumed until a connection's round trip was measured
RTT_SAMPLES = 8  # round trips the guard is taken from: the least of the latest
READ_LAG_S = 2.0  # a handle read this long after it arrived is still placed exactly


class Placement(Protocol):
    """Which of the input written to one connection its next handle surely holds."""

    def written(self, seq: int, now: float) -> None:
        """Input `seq` (and all before it) left for the service at `now`."""

    def sent(self, seq: int | None) -> None:
        """One client message is being written; the newest input in it (or, for one with
        none, such as a tool response, before it) is `seq` (None: no input yet)."""

    def measured(self, rtt: float) -> None:
        """A round trip measured on the connection (a prompt pong's)."""

    def setup(self, rtt: float) -> None:
        """The connection's setup round trip: a bound on its data path's."""

    def covered(self, now: float, consumed: int | None = None) -> int | None:
        """The newest input a handle arriving `now` holds (None: none written to it);
        `consumed`: the last client message it holds, where the service says so."""

    def newest(self) -> int | None:
        """The newest input the last handle placed may hold (None: none)."""


class RoundTripPlacement:
    """A handle holds what was written at least a guard interval before it arrived."""

    def __init__(self) -> None:
        self.rtt = DEFAULT_RTT_S
        self._samples: deque[float] = deque(maxlen=RTT_SAMPLES)  # the setup's, then pongs'
        self._writes: deque[tuple[int, float]] = deque()  # (seq, written at)

    def guard(self) -> float:
        return 1.5 * self.rtt + GUARD_MARGIN_S

    def written(self, seq: int, now: float) -> None:
        writes = self._writes
        writes.append((seq, now))
        # Keep only what placement can still use: the newest entry older than the guard
        # of a handle that arrived up to READ_LAG_S ago (read only now), and all after it.
        horizon = now - self.guard() - READ_LAG_S
        while len(writes) > 1 and writes[1][1] <= horizon:
            writes.popleft()

    def sent(self, seq: int | None) -> None:
        pass  # placed by when input was written, not by message

    def measured(self, rtt: float) -> None:
        self._samples.append(rtt)
        self.rtt = min(self._samples)  # each bounds the data path's: the tightest

    def setup(self, rtt: float) -> None:
        self._samples.append(rtt)
        self.rtt = min(DEFAULT_RTT_S, *self._samples)  # the default until one beats it

    def covered(self, now: float, consumed: int | None = None) -> int | None:
        horizon = now - self.guard()
        placed = None
        for seq, at in self._writes:
            if at > horizon:
                break
            placed = seq
        return placed

    def newest(self) -> int | None:
        return self._writes[-1][0] if self._writes else None


class IndexPlacement(RoundTripPlacement):
    """A handle holds the input of the client messages up to the one it names.

    Messages are numbered per connection, the setup 0 and each message after it one more
    (Google's Live API session-manager guide, vertex-ai-samples
    skills/genai-sdk/references/live_api/references/session_manager.md); the driver reports
    each as it writes it, in the order it goes out. A handle without an index is placed by
    the round trip (the base class).
    """

    MARKS_KEPT = 4096  # messages not yet placed (past it the oldest go: more is replayed)

    def __init__(self) -> None:
        super().__init__()
        self._count = 0  # messages written after the setup
        self._input: int | None = None  # newest input written
        # (message number, newest input in or before it), oldest first, not yet placed
        self._marks: deque[tuple[int, int]] = deque(maxlen=self.MARKS_KEPT)
        self._placed: int | None = None  # newest input the newest index placed
        self._indexed = False  # the last handle named its message: nothing else in doubt

    def sent(self, seq: int | None) -> None:
        self._count += 1
        if seq is not None:
            self._input = seq
        if self._input is not None:
            self._marks.append((self._count, self._input))

    def covered(self, now: float, consumed: int | None = None) -> int | None:
        self._indexed = consumed is not None
        if consumed is None:
            return super().covered(now)
        marks = self._marks
        while marks and marks[0][0] <= consumed:
            self._placed = marks.popleft()[1]
        return self._placed

    def newest(self) -> int | None:
        return self._placed if self._indexed else super().newest()


class HeldHandle:
    """The newest trusted handle: a reset resumes from it and replays what it lacks."""

    def __init__(self) -> None:
        self.handle: str | None = None
        self.base = 0  # inputs <= base are in its state (or were never needed)
        self.overlap_s = 0.0  # input after the base that it may hold already
        self.replies = 0  # model replies its state holds

    def offer(self, handle: str, base: int, replies: int, overlap_s: float) -> bool:
        """A handle of the active lineage holding input up to `base`, `replies` replies,
        and maybe `overlap_s` of audio beyond: True if it is taken."""
        if (
            self.handle is not None
            and base == self.base
            and replies == self.replies
            and overlap_s > self.overlap_s
        ):
            # It says no more than the handle held, and it may hold input we cannot place
            # (a replay written within the guard): resuming it could send that input twice.
            return False
        self.handle, self.base, self.overlap_s, self.replies = handle, base, overlap_s, replies
        return True

    def refused(self) -> None:
        """The service refused it for good: the next connection is a fresh session (its
        base stays: what it covered is in the history that briefs that session)."""
        self.handle = None
