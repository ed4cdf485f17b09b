"""Reading a simulated call back: which replies the caller heard, and the WAV of it."""

from __future__ import annotations

import asyncio
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from gateway.testing.live_emulator import reply_freq, reply_position
from gateway.testing.twilio_sim import CallRecord, HeardAudio, SimulatedCall, dominant_frequency

try:
    import audioop
except ImportError:  # pragma: no cover - Python 3.13 without audioop-lts
    raise

RATE = 8000
WINDOW = 160  # 20 ms at 8 kHz
WINDOW_S = WINDOW / RATE
PLAYBACK_GAP_S = 0.1  # runs of one reply closer than this are one reply in heard_replies
# A run goes on where the one before it stopped when it is first heard this near (in the
# reply's length, measured by level) to where that one was last heard: a little after it.
CONTINUES = (-0.06, 0.15)
LOOKBACK_S = 5.0  # how far back await_reply looks for the reply it waits for, after a first look


@dataclass(frozen=True)
class Segment:
    """A run of sound on the caller's timeline."""

    start_s: float
    end_s: float
    freq_hz: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class HeardReply:
    """A reply the caller heard: its number (from its pitch), when, and where in the reply
    its sound began and ended (0 its start, 1 its end: the emulator's replies rise in level,
    :func:`gateway.testing.live_emulator.reply_position`)."""

    n: int
    start_s: float
    duration_s: float  # from its first sound to its last (gaps included, when joined)
    first_pos: float = 0.0
    last_pos: float = 1.0
    heard_s: float | None = None  # its sound without the gaps (duration_s when None)

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s

    @property
    def sound_s(self) -> float:
        return self.duration_s if self.heard_s is None else self.heard_s


def timeline(record: CallRecord) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.int16]]:
    """(caller, heard) as 8 kHz int16 on one timeline starting at the stream's start."""
    caller = np.frombuffer(audioop.ulaw2lin(bytes(record.sent_ulaw), 2), dtype=np.int16)
    heard = _heard_from(record, 0)
    end = max(len(caller), len(heard))
    return _padded(caller, end), _padded(heard, end)


def _padded(pcm: npt.NDArray[np.int16], n: int) -> npt.NDArray[np.int16]:
    return pcm if len(pcm) >= n else np.concatenate([pcm, np.zeros(n - len(pcm), np.int16)])


def _origin(record: CallRecord) -> float | None:
    """When the stream started (the timeline's 0, monotonic), or None before it did."""
    return next((t for t, kind, _ in record.events if kind == "start_tx"), None)


def _position_s(record: CallRecord) -> float:
    """Now, in seconds of the caller's timeline (0 before the stream started)."""
    origin = _origin(record)
    return 0.0 if origin is None else (time.monotonic() - origin) * record.speed


def _heard_from(record: CallRecord, first: int) -> npt.NDArray[np.int16]:
    """What the caller heard from sample `first` of the heard track on (8 kHz from the
    stream's start): each chunk where it started playing, a later one over an overlap."""
    origin = _origin(record)
    if origin is None or not record.heard:
        return np.zeros(0, dtype=np.int16)
    per_second = RATE * record.speed

    def place(chunk: HeardAudio) -> int:
        return max(0, round((chunk.at - origin) * per_second))

    chunks = record.heard
    start = len(chunks)  # playback is in order: only the chunks that end after `first`
    while start > 0 and place(chunks[start - 1]) + len(chunks[start - 1].ulaw) > first:
        start -= 1
    end = max(first, place(chunks[-1]) + len(chunks[-1].ulaw))
    heard = np.zeros(end - first, dtype=np.int16)
    for chunk in chunks[start:]:
        pos = place(chunk)
        pcm = np.frombuffer(audioop.ulaw2lin(chunk.ulaw, 2), dtype=np.int16)
        skip = max(0, first - pos)
        heard[pos + skip - first : pos - first + len(pcm)] = pcm[skip:]
    return heard


def segments(
    pcm: npt.NDArray[np.int16], threshold: float = 500.0, rate: int = RATE, first: int = 0
) -> list[Segment]:
    """Runs of 20 ms windows whose RMS exceeds `threshold`, with their pitch; `pcm` begins
    `first` samples into the timeline (a multiple of the window)."""
    window = rate // 50
    n = len(pcm) // window
    if n == 0:
        return []
    frames = pcm[: n * window].astype(np.float64).reshape(n, window)
    loud = np.sqrt((frames**2).mean(axis=1)) > threshold
    found: list[Segment] = []
    i = 0
    while i < n:
        if not loud[i]:
            i += 1
            continue
        j = i
        while j < n and loud[j]:
            j += 1
        piece = pcm[i * window : j * window]
        start, end = first + i * window, first + j * window
        found.append(Segment(start / rate, end / rate, dominant_frequency(piece, rate)))
        i = j
    return found


def reply_number(freq_hz: float, tolerance_hz: float = 12.0) -> int | None:
    """The reply number n whose pitch is `freq_hz` (within the first 50), or None."""
    for n in range(1, 51):
        if abs(reply_freq(n) - freq_hz) <= tolerance_hz:
            return n
    return None


def _close(before: HeardReply, after: HeardReply) -> bool:
    """Two runs less than PLAYBACK_GAP_S apart, counted in the 20-ms windows they are measured
    in (so the same runs read the same whatever float sums led to their times)."""
    return round((after.start_s - before.end_s) / WINDOW_S) < round(PLAYBACK_GAP_S / WINDOW_S)


def heard_pieces(record: CallRecord, min_s: float = 0.04, since_s: float = 0.0) -> list[HeardReply]:
    """Each unbroken run of a reply the caller heard (from `since_s` on), in order."""
    first = int(since_s * RATE) // WINDOW * WINDOW
    heard = _heard_from(record, first)
    found = []
    for seg in segments(heard, first=first):
        n = reply_number(seg.freq_hz)
        if n is None or seg.duration_s < min_s:
            continue
        run = heard[round(seg.start_s * RATE) - first : round(seg.end_s * RATE) - first]
        found.append(HeardReply(n, seg.start_s, seg.duration_s, *_positions(run)))
    return found


def _positions(run: npt.NDArray[np.int16]) -> tuple[float, float]:
    """Where in its reply a run of whole 20-ms windows is heard first and last: the level of
    its second window and of its second-to-last (the edge windows may be part silence)."""
    windows = run[: len(run) // WINDOW * WINDOW].astype(np.float64).reshape(-1, WINDOW)
    pos = [reply_position(float(r)) for r in np.sqrt((windows**2).mean(axis=1))]
    if len(pos) >= 3:
        return pos[1], pos[-2]
    at = max(pos, default=0.0)  # too short: its fullest window
    return at, at


def _goes_on(before: HeardReply, after: HeardReply) -> bool:
    """`after` is the same reply as `before` and is first heard where `before` was last."""
    return before.n == after.n and CONTINUES[0] <= after.first_pos - before.last_pos <= CONTINUES[1]


def _join(before: HeardReply, after: HeardReply, *, gap_heard: bool) -> HeardReply:
    """One reply of two runs: spanning both; the gap counted as sound when `gap_heard`."""
    gap = after.start_s - before.end_s if gap_heard else 0.0
    return HeardReply(
        after.n,
        before.start_s,
        after.end_s - before.start_s,
        before.first_pos,
        after.last_pos,
        before.sound_s + gap + after.duration_s,
    )


def _joined_runs(pieces: list[HeardReply], *, by_gap: bool) -> list[HeardReply]:
    """Runs of one reply joined: one that goes on where the one before stopped (a stall,
    however long: its gap is not sound) and, with `by_gap`, one less than PLAYBACK_GAP_S
    after it (its gap counted as sound)."""
    found: list[HeardReply] = []
    for piece in pieces:
        last = found[-1] if found else None
        if by_gap and last is not None and last.n == piece.n and _close(last, piece):
            found[-1] = _join(last, piece, gap_heard=True)
        elif last is not None and _goes_on(last, piece):
            found[-1] = _join(last, piece, gap_heard=False)
        else:
            found.append(piece)
    return found


def playings(pieces: list[HeardReply]) -> list[HeardReply]:
    """Each playing of a reply: its unbroken runs, a run joined to the one before when it
    goes on where that one stopped (a stall of the caller's playback, however long), not
    when it starts again from the top (the reply said again).

    A joined playing's `duration_s` spans it, gaps included; its `heard_s` is its sound."""
    return _joined_runs(pieces, by_gap=False)


def heard_replies(
    record: CallRecord, min_s: float = 0.04, since_s: float = 0.0
) -> list[HeardReply]:
    """The replies on the caller's side of the line, in the order heard: runs of one reply
    less than PLAYBACK_GAP_S apart are one (so a reply cut and at once said again reads as
    one), and so is a playing split by a stall of any length (:func:`playings`).

    A stall's gap is not counted in `sound_s`; a gap under PLAYBACK_GAP_S is."""
    return _joined_runs(heard_pieces(record, min_s, since_s), by_gap=True)


def _replies_since(record: CallRecord, since_s: float) -> list[HeardReply]:
    """:func:`heard_replies` from `since_s` on, as await_reply's `read` calls it."""
    return heard_replies(record, since_s=since_s)


def heard_playings(record: CallRecord, since_s: float = 0.0) -> list[HeardReply]:
    """Each playing of a reply the caller heard (:func:`playings`), from `since_s` on."""
    return playings(heard_pieces(record, since_s=since_s))


async def await_reply(
    call: SimulatedCall,
    n: int,
    *,
    min_s: float = 0.7,
    limit_s: float = 20.0,
    step_s: float = 0.1,
    read: Callable[[CallRecord, float], list[HeardReply]] | None = None,
) -> None:
    """Keep the line open (silence, as Twilio streams it) until the caller has heard at least
    `min_s` of reply `n`; TimeoutError, naming what was heard, after `limit_s`. `read`
    (record, seconds into the call to read from) says what was heard: :func:`heard_replies`
    if None, :func:`heard_playings` to count a playing split by stalls whole.

    The simulator counts a chunk as heard when it starts playing and cuts it short if the
    call ends first, so this also waits for the chunk playing to end: a hang-up right after
    takes nothing away from what was counted here.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    # After a first look at the whole call, only its recent part: reading all of a long call
    # every step would stall the event loop the call shares (and split what it plays).
    since_s = 0.0
    replies_from = read or _replies_since

    def heard() -> bool:
        replies = replies_from(call.record, since_s)
        return any(r.n == n and r.sound_s > min_s for r in replies)

    while not heard():
        since_s = max(0.0, _position_s(call.record) - LOOKBACK_S)
        if loop.time() > deadline or call.closed:
            so_far = replies_from(call.record, 0.0)
            raise TimeoutError(f"reply {n} not heard; heard {so_far}")
        await call.silence(step_s)
    last = call.record.heard[-1]
    played = last.at + len(last.ulaw) / (RATE * call.record.speed)
    while time.monotonic() < played and not call.closed:  # the simulator's clock
        await call.silence(step_s)


def write_wav(record: CallRecord, path: Path) -> float:
    """Stereo 8 kHz WAV: caller left, what the caller heard right. Returns seconds."""
    caller, heard = timeline(record)
    stereo = np.empty(len(caller) * 2, dtype="<i2")
    stereo[0::2] = caller
    stereo[1::2] = heard
    with wave.open(str(path), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes(stereo.tobytes())
    return len(caller) / RATE
