"""Is the reply the model is starting the same as one the caller already heard in full?

After a reset the resumed state may come from a handle issued before a reply the caller
heard to the end (handles are not resumable while the model speaks, and a cut can come
before the next one). Replaying the caller's audio from there, the model answers that
utterance again. The transcripts tell: the model's words so far are compared with the
start of what the caller heard. Undecided until a few words are in; on no evidence the
reply is played, so a caller is never left in silence by a wrong guess.
"""

from __future__ import annotations

import re
from difflib import SequenceMatcher

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
