"""Prompting a model left silent after a reset.

A resumed session may answer the replayed input again by itself, or wait for new input;
in the second case a caller whose reply was cut (or whose last words were not answered
yet) would be left in silence. So after such a reset, if the model says nothing for
``resume_nudge_s`` (and the caller is not speaking), it is given a text turn: answer
again, or go on from what the caller heard of the cut reply. Anything the model says that
reaches the caller calls it off.
"""

from __future__ import annotations

DROPPED = (
    "(The line dropped for a moment. If the caller's last words need an answer, answer them now.)"
)
CUT_UNHEARD = "(The line dropped before the caller heard your answer. Please answer again.)"
HEARD_KEPT = 600  # characters of the cut reply quoted back to the model


def cut_heard(heard: str) -> str:
    return (
        "(The line dropped while you were answering. The caller heard this much: "
        f'"{heard[-HEARD_KEPT:]}". Continue from there without repeating it.)'
    )


class Nudge:
    """When to prompt a silent model, and with what."""

    def __init__(self, after_s: float) -> None:
        self._after_s = after_s
        self.at: float | None = None  # prompt then, unless called off
        self.cut = False  # a reset cut a reply and the model has said nothing heard since
        self._heard = ""  # what the caller heard of that reply

    def reply_cut(self, heard: str) -> None:
        """A reset cut the model's reply; the caller heard `heard` of it."""
        self.cut = True
        self._heard = heard

    def resumed(self, now: float, unanswered: bool) -> None:
        """A connection took over after a reset; `unanswered`: the caller spoke last."""
        if self.cut or unanswered:
            self.at = now + self._after_s

    def heard(self) -> None:
        """The model's words reach the caller: no prompt needed."""
        self.at = None
        self.cut = False

    def repeat_skipped(self, caller_spoke_after: bool, began_at: float) -> None:
        """The model's reply (begun at `began_at`) repeats one the caller heard in full and
        is not played. If the caller spoke after hearing it, it may have been meant for
        that: if the model then stays silent, prompt it."""
        if caller_spoke_after:
            self.at = self.at or began_at + self._after_s
        elif not self.cut:
            self.at = None  # the caller had this answer already

    def cancel(self) -> None:
        self.at = None

    def due(self, now: float, caller_quiet_at: float | None, talking: bool) -> str | None:
        """The prompt to send now, if any. `caller_quiet_at`: the caller is speaking and
        counts as quiet from then; `talking`: the model's reply is being held or skipped."""
        if caller_quiet_at is not None:
            self.at = caller_quiet_at
            return None
        if talking:
            self.at = now + self._after_s
            return None
        self.at = None
        cut, self.cut = self.cut, False
        heard = self._heard.strip()
        if not cut:
            return DROPPED
        return cut_heard(heard) if heard else CUT_UNHEARD
