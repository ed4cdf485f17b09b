"""The gateway's own moves in a call: checking on a silent caller, wrapping up at a limit.

Bookkeeping only (no I/O, no clock of its own); the call feeds it what happens and asks
what is due:

* **Silence** (`silence_timeout_s`, 0 = off): when the caller says nothing for that long
  after the bot finished speaking (its last reply heard to the end), the model is asked to
  check in (`silence_prompt`); after a second such silence it says goodbye
  (`silence_goodbye`) and the call ends once that was heard. Caller speech starts over.
* **Duration** (`max_call_s`, 0 = off): at `wrap_up_at` of it the model is asked to wrap
  up (`wrap_up`) and the call ends once its goodbye was heard; at the limit itself the
  call ends whatever is happening.
* **Tokens** (`max_call_tokens`, 0 = off) and **cost** (`max_call_usd`, 0 = off: the
  call's tokens at TOKEN_PRICES, what the operator pays for it): the same wrap-up once the
  call's tokens or cost reach `wrap_up_at` of the limit. The service counts tokens at the
  end of each model turn, so the call can pass the limit by the goodbye's turn.
* **Cost per day** (`max_day_usd`, 0 = off: the persona's calls today, from every replica,
  `gateway.budget`): the same wrap-up once the day's total reaches the limit itself.

A call that moves to another replica (a hand-off, a recovery) keeps its schedule: the watch's
:meth:`CallWatch.marks` go with its state, and the next replica's watch :meth:`~CallWatch.carry_on`
from them (the duration limits already run from the call's age).
"""

from __future__ import annotations

from enum import StrEnum

from gateway.personas import CallPolicy


class Move(StrEnum):
    """What the watch asks the call to do; the value names the reason (a metric label)."""

    CHECK_IN = "silence_check_in"  # ask the model to check on the caller
    SILENCE = "silence"  # goodbye, then end
    WRAP_UP_DURATION = "max_duration"  # wrap up, then end
    WRAP_UP_TOKENS = "max_tokens"  # wrap up, then end
    WRAP_UP_COST = "max_cost"  # wrap up, then end
    WRAP_UP_DAY_COST = "max_day_cost"  # wrap up, then end
    LIMIT = "max_duration_reached"  # end now


class CallWatch:
    """When a call's silence and limit moves are due."""

    def __init__(self, policy: CallPolicy, started_at: float) -> None:
        self._silence_s = policy.silence_timeout_s
        self._max_s = policy.max_call_s
        self._max_tokens = policy.max_call_tokens
        self._max_usd = policy.max_call_usd
        self._max_day_usd = policy.max_day_usd
        self._wrap_up_at = policy.wrap_up_at
        self._started_at = started_at
        self._caller_spoke_at = started_at
        self._bot_quiet_since: float | None = started_at
        self._check_ins = 0  # check-ins since the caller last spoke
        self._wrapped_up = False
        self._limit_hit = False
        self.ending = False  # the call is ending: no more silence or wrap-up moves

    @property
    def timed(self) -> bool:
        """Whether anything here depends on time (else `due` never has a move)."""
        return bool(self._silence_s or self._max_s)

    @property
    def listens(self) -> bool:
        """Whether the caller's speech matters (silence handling is on)."""
        return bool(self._silence_s)

    def caller_spoke(self, at: float) -> None:
        self._caller_spoke_at = at
        self._check_ins = 0

    def bot_speaking(self) -> None:
        self._bot_quiet_since = None

    def bot_quiet(self, at: float) -> None:
        """The caller has heard everything the bot said (its marks came back)."""
        if self._bot_quiet_since is None:
            self._bot_quiet_since = at

    def tokens(self, total: int, cost_usd: float | None = None) -> Move | None:
        """The wrap-up, once, when the call's tokens or cost reach their share of a limit."""
        if self._wrapped_up or self.ending:
            return None
        if self._max_tokens and total >= self._wrap_up_at * self._max_tokens:
            self._wrapped_up = True
            return Move.WRAP_UP_TOKENS
        if self._max_usd and cost_usd is not None and cost_usd >= self._wrap_up_at * self._max_usd:
            self._wrapped_up = True
            return Move.WRAP_UP_COST
        return None

    def day_cost(self, total_usd: float) -> Move | None:
        """The wrap-up, once, when the persona's spend today reaches its daily limit."""
        if self._wrapped_up or self.ending or not self._max_day_usd:
            return None
        if total_usd >= self._max_day_usd:
            self._wrapped_up = True
            return Move.WRAP_UP_DAY_COST
        return None

    def due(self, now: float) -> tuple[Move | None, float | None]:
        """The move due at `now` (at most one), else None and when to ask again (None:
        not before the call reports something)."""
        wake: list[float] = []
        if self._max_s and not self._limit_hit:
            limit = self._started_at + self._max_s
            if now >= limit:
                self._limit_hit = True
                return Move.LIMIT, None
            wake.append(limit)
            wrap = self._started_at + self._wrap_up_at * self._max_s
            if not self._wrapped_up and not self.ending:
                if now >= wrap:
                    self._wrapped_up = True
                    return Move.WRAP_UP_DURATION, None
                wake.append(wrap)
        if self._silence_s and not self.ending and self._bot_quiet_since is not None:
            since = max(self._bot_quiet_since, self._caller_spoke_at)
            if now >= since + self._silence_s:
                if self._check_ins == 0:
                    self._check_ins = 1
                    self._bot_quiet_since = now  # again from here, if the model says nothing
                    return Move.CHECK_IN, None
                self.ending = True
                return Move.SILENCE, None
            wake.append(since + self._silence_s)
        return None, min(wake) if wake else None

    def marks(self, now: float) -> dict[str, float]:
        """Where the silence and wrap-up moves stand at `now`, for the call's next replica
        (times as seconds before `now`; `bot_quiet_s` absent while the bot speaks)."""
        marks = {
            "caller_quiet_s": now - self._caller_spoke_at,
            "check_ins": float(self._check_ins),
            "wrapped_up": float(self._wrapped_up),
        }
        if self._bot_quiet_since is not None:
            marks["bot_quiet_s"] = now - self._bot_quiet_since
        return marks

    def carry_on(self, marks: dict[str, float], now: float, since_s: float) -> None:
        """Go on from another replica's :meth:`marks`, taken `since_s` before `now`: the
        caller's silence and the bot's quiet count on through the move (a bot that was
        speaking is quiet from now: nothing plays on the new stream until it speaks)."""
        self._caller_spoke_at = now - since_s - max(0.0, marks.get("caller_quiet_s", 0.0))
        bot_quiet_s = marks.get("bot_quiet_s")
        quiet_since = None if bot_quiet_s is None else now - since_s - max(0.0, bot_quiet_s)
        self._bot_quiet_since = now if quiet_since is None else quiet_since
        self._check_ins = int(marks.get("check_ins", 0))
        self._wrapped_up = bool(marks.get("wrapped_up", 0))
