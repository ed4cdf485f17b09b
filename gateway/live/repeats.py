"""Is the reply the model is starting the same as one the caller already heard in full?

After a reset the resumed state may come from a handle issued before a reply the caller
heard to the end (handles are not resumable while the model speaks, and a cut can come
before the next one). Replaying the caller's audio from there, the model answers that
utterance again. The transcripts tell: the model's words so far are compared with the
start of what the caller heard (`same_reply`). Undecided until a few words are in; on no
evidence the reply is played, so a caller is never left in silence by a wrong guess.

`RepeatFilter` applies it: each reply heard in full is kept with its transcript and the
number of replies the state held after it; a connection resumed from a state with fewer
makes those the candidates; its first reply beginning within ``REPEAT_WINDOW_S`` of the
resume (the answers to replayed audio come first) is held, at most ``repeat_judge_s``,
until its words tell. A repeat is not played unless its words part from the heard ones
later (then the rest is played).
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from difflib import SequenceMatcher

from gateway.live.events import LiveEvent, ModelAudio

SAID_KEPT = 16  # replies heard in full, kept to recognise them if said again
REPEAT_WINDOW_S = 5.0  # a resumed connection's replies that begin this soon may be repeats
OUTPUT_RATE = 24000  # the model's audio, 16-bit PCM
MIN_WORDS = 4  # words of the new reply needed before judging (fewer if the heard one is shorter)
MATCH = 0.8  # share of the new reply's words found, in order, in the start of the heard one
SLACK_WORDS = 2  # the heard reply's start is read this many words longer than the new one

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def same_reply(heard: str, said: str, final: bool = False) -> bool | None:
    """True: `said` (the new reply so far) repeats `heard`; False: it does not; None: not
    enough words yet (`final`: the reply is over, judge on what there is)."""
    h, s = words(heard), words(said)
    if not h or not s:
        return None if not final and h else False
    if len(s) < min(MIN_WORDS, len(h)) and not final:
        return None
    start = h[: len(s) + SLACK_WORDS]
    blocks = SequenceMatcher(None, s, start, autojunk=False).get_matching_blocks()
    return sum(b.size for b in blocks) >= MATCH * len(s)


@dataclass(frozen=True, slots=True)
class Repeat:
    """The reply in progress says again one the caller heard in full."""

    text: str  # what the caller heard
    heard_at: float  # when that reply ended
    held_s: float  # the audio held while judging (not played)


class RepeatFilter:
    """Replies heard in full, and whether the reply in progress is held, played or skipped."""

    def __init__(self, judge_s: float) -> None:
        self._judge_s = judge_s
        self.text = ""  # the transcript of the reply in progress
        # (replies the state held after it, transcript, when it ended)
        self._heard: deque[tuple[int, str, float]] = deque(maxlen=SAID_KEPT)
        self._candidates: list[tuple[str, float]] = []  # what a resumed model may say again
        self.judge_until: float | None = None  # the reply is held until then at the latest
        self._held: list[LiveEvent] = []
        self._held_s = 0.0
        self.skipping: str | None = None  # the heard reply the one in progress repeats

    @property
    def unheard(self) -> bool:
        """The reply in progress is held or skipped: the caller hears none of it."""
        return self.skipping is not None or self.judge_until is not None

    def resumed(self, replies: int) -> None:
        """A connection whose state holds `replies` replies took over."""
        self._candidates = [(text, at) for n, text, at in self._heard if n > replies]

    def began(self, now: float, since_resume_s: float) -> None:
        """A reply began `since_resume_s` after its connection took over."""
        self.text = ""
        if self._candidates and since_resume_s <= REPEAT_WINDOW_S:
            if self._judge_s > 0:
                self.judge_until = now + self._judge_s
        else:
            self._candidates.clear()

    def hold(self, event: LiveEvent) -> None:
        """Keep a piece of the reply being judged."""
        self._held.append(event)
        if isinstance(event, ModelAudio):
            self._held_s += len(event.pcm) / (2 * OUTPUT_RATE)

    def judge(self, final: bool) -> Repeat | bool | None:
        """Like `same_reply` for the held reply: a `Repeat` (it is skipped from now on),
        False (it is new: `release` it) or None (not enough words yet; `final`: the reply
        is over, judge on what there is)."""
        verdicts = [same_reply(heard, self.text, final) for heard, _ in self._candidates]
        if True not in verdicts:
            return None if None in verdicts else False
        text, heard_at = self._candidates.pop(verdicts.index(True))
        held_s = self._held_s
        self.stop()
        self.skipping = text
        return Repeat(text, heard_at, held_s)

    def release(self) -> list[LiveEvent]:
        """Stop holding: what was held, to play."""
        held = self._held
        self.stop()
        return held

    def diverges(self) -> bool:
        """The skipped reply's words now part from the heard one's: play the rest."""
        assert self.skipping is not None
        if same_reply(self.skipping, self.text) is not False:
            return False
        self.skipping = None
        return True

    def ended(self, replies: int | None, now: float) -> bool:
        """The model's turn ended: True if its reply was skipped. Otherwise a reply heard
        to its end (`replies`: those the state then holds; None: no reply) is kept."""
        if self.skipping is not None:
            self.skipping = None
            return True
        if replies is not None and self.text.strip():
            self._heard.append((replies, self.text, now))
        return False

    def stop(self) -> None:
        """Nothing is held or skipped any more (the reply ended or was cut)."""
        self._held = []
        self._held_s = 0.0
        self.judge_until = None
        self.skipping = None
