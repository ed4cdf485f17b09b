"""Discontinuous transmission of the caller's audio: the model is not sent long silences.

Why: the Live service bills caller audio by its duration, silence like speech, and every
model turn bills the whole context again, past silence included (the public reports behind
`gateway.testing.billing`; docs/benchmarks.md, "The model's bill"). Much of a phone call is
the caller listening. Telephony stopped sending silence decades ago (G.729 Annex B's voice
activity detection and discontinuous transmission, Opus DTX): after a stretch of silence the
sender stops, and starts again at the next sound. So here: once the caller has been silent
for ``hangover_s``, streaming stops and the service is told the stream paused (the Live API
asks for ``audioStreamEnd`` when audio pauses for more than a second, to flush what it has
cached); at the first frame that may be speech the last ``pre_roll_s`` of the withheld audio
goes out before it, so the service's own voice detection hears the word from before its
start.

Frames in (the caller's 20 ms frames, with their RMS as 16-bit PCM), what to send out:
:meth:`CallerDtx.feed` answers the frames to send now, in order (none, this one, or the
pre-roll and this one) and whether the stream pauses. No I/O, no clock: decisions are counted
in frames, so time-compressed tests and benches decide as real calls do.

The thresholds, and what they rest on:

* **A frame may be speech** when its level is above ``ABSOLUTE_FLOOR_DBFS`` (-60 dBFS: below
  any speech a telephone line carries, above μ-law's idle code and the quietest line noise)
  and ``MARGIN_DB`` (6 dB) above the line's noise floor: the quietest frame of the last
  ``FLOOR_WINDOW_S`` (8 s; "minimum statistics", as noise estimators for speech have long
  done). Speech always has quieter frames between its syllables and words, so the floor
  stays at the line's noise while anyone talks, and a noisier line is learnt within the
  window; a steady sound longer than the window (a test tone, a hum) becomes the floor. It
  is meant to fire on more than the service's voice detection would (that
  one ignores what is under about -40 dBFS in the emulator; the real one's threshold is not
  published): a false start costs a few tokens, a missed one would cost a word.
* **Hangover** (``hangover_s``, 1 s): the stream goes on for that long after the last frame
  that may be speech, so the pauses inside a sentence go out as they were, and the service
  hears the silence that ends a turn (its end-of-speech wait: 0.4-0.5 s in the emulator; the
  real one is unpublished, and a second is more than the usual settings) before the pause.
  A second is also the docs' threshold for ``audioStreamEnd``.
* **Pre-roll** (``pre_roll_s``, 0.3 s): a word's first sound (a fricative, a stop) can be
  20-30 dB below its vowel and under the line noise, so the detector may fire only on the
  vowel; those consonants last well under 0.2 s. The pre-roll is sent at once, ahead of the
  frame that resumed the stream, and counted as sent.

What it risks: speech quieter than the line noise plus 6 dB for longer than the pre-roll
before anything louder would not be heard (no test speech, from -40 dBFS over -50 dBFS of
noise, comes near it: tests/test_dtx.py); and the model gets the silence of a pause only as
the pause itself (``audioStreamEnd``), which is what the docs ask for.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

FRAME_S = 0.02
ABSOLUTE_FLOOR_DBFS = -60.0
MARGIN_DB = 6.0
FLOOR_WINDOW_S = 8.0
FLOOR_BLOCK_S = 0.5  # the window's minimum is kept per block of this long
SILENT_DBFS = -100.0  # the level of digital silence (an RMS of 0)


def level_dbfs(rms: float) -> float:
    """A 16-bit RMS in dB below full scale."""
    return 20 * math.log10(rms / 32768) if rms > 0 else SILENT_DBFS


@dataclass(frozen=True, slots=True)
class Out:
    """What to do with one frame: send these frames now (in order), then pause the stream
    (tell the service, after them) when ``pause``."""

    frames: tuple[bytes, ...] = ()
    pause: bool = False


NOTHING = Out()


class CallerDtx:
    """The caller's audio, sent or withheld frame by frame (see the module docstring)."""

    def __init__(self, hangover_s: float = 1.0, pre_roll_s: float = 0.3) -> None:
        self._hangover = max(1, round(hangover_s / FRAME_S))
        self._held: deque[bytes] = deque(maxlen=max(1, round(pre_roll_s / FRAME_S)))
        self._block_frames = round(FLOOR_BLOCK_S / FRAME_S)
        # Until a window was measured, the floor is taken as low as speech could be quiet:
        # speech from the call's first frame is speech, noise above that is sent until learnt.
        blocks = round(FLOOR_WINDOW_S / FLOOR_BLOCK_S)
        self._blocks: deque[float] = deque([ABSOLUTE_FLOOR_DBFS] * blocks, maxlen=blocks)
        self._block_min = math.inf
        self._block_len = 0
        self._quiet = 0  # frames since the last one that may be speech
        self.paused = False
        self.withheld_frames = 0  # withheld for good: older than the pre-roll when withheld
        self.pauses = 0

    @property
    def held_frames(self) -> int:
        """Frames withheld that a resume would still send (the pre-roll)."""
        return len(self._held)

    def may_be_speech(self, rms: float) -> bool:
        """Whether a frame of this RMS may be speech; tracks the line's noise floor."""
        level = level_dbfs(rms)
        self._block_min = min(self._block_min, level)
        self._block_len += 1
        floor = min(self._block_min, *self._blocks)
        if self._block_len == self._block_frames:
            self._blocks.append(self._block_min)
            self._block_min, self._block_len = math.inf, 0
        return level > max(ABSOLUTE_FLOOR_DBFS, floor + MARGIN_DB)

    def feed(self, frame: bytes, rms: float) -> Out:
        """One caller frame in (``rms``: its RMS as 16-bit PCM); what to send."""
        if self.may_be_speech(rms):
            self._quiet = 0
            if self.paused:
                self.paused = False
                frames = (*self._held, frame)
                self._held.clear()
                return Out(frames)
            return Out((frame,))
        self._quiet += 1
        if self.paused:
            self._hold(frame)
            return NOTHING
        if self._quiet > self._hangover:
            self.paused = True
            self.pauses += 1
            self._hold(frame)
            return Out(pause=True)
        return Out((frame,))

    def _hold(self, frame: bytes) -> None:
        if len(self._held) == self._held.maxlen:
            self.withheld_frames += 1  # the oldest of the pre-roll leaves it
        self._held.append(frame)
