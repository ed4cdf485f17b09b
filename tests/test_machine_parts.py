"""The session machine's named parts, each on its own (`tests/test_session_machine.py`
drives them together through the facade and the schedule explorer)."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from gateway.live.events import ModelAudio, ResetCause, Transcript, TurnState
from gateway.live.handles import HeldHandle, RoundTripPlacement
from gateway.live.history import History
from gateway.live.looplag import LoopLag, loop_lag
from gateway.live.nudge import CUT_UNHEARD, DROPPED, Nudge
from gateway.live.outage import Outage
from gateway.live.repeats import REPEAT_WINDOW_S, Repeat, RepeatFilter
from gateway.live.replay import BYTES_PER_SECOND, Input, ReplayLog
from gateway.live.retry import FailureReason, RetryBudget
from gateway.live.settings import LiveSettings
from gateway.live.switch import GoAwaySwitch, SwitchMode
from gateway.live.turns import Turns

SECOND = b"\x00" * BYTES_PER_SECOND


# ----------------------------------------------------------------------- replay log


def test_the_replay_log_numbers_input_and_replays_what_a_base_lacks() -> None:
    log = ReplayLog(limit_s=10.0)
    items = [Input(0, audio=SECOND), Input(0, text="hi"), Input(0, audio=SECOND[:16000])]
    for item in items:
        assert log.add(item, written_upto=0) == []
    assert [i.seq for i in items] == [1, 2, 3] and log.seq == 3
    assert log.after(1) == (items[1], items[2])
    assert log.seconds_between(0, 2) == 1.0
    assert log.seconds_between(1, 3) == 0.5
    log.forget_upto(2)
    assert list(log) == [items[2]]
    log.check()


def test_audio_pushed_out_before_it_was_written_is_lost_at_once() -> None:
    log = ReplayLog(limit_s=2.0)
    log.add(Input(0, audio=SECOND), written_upto=0)
    log.add(Input(0, text="kept: text costs nothing"), written_upto=0)
    log.add(Input(0, audio=SECOND), written_upto=0)
    assert log.add(Input(0, audio=SECOND), written_upto=0) == [1.0]
    assert [i.seq for i in log] == [2, 3, 4]
    assert log.lost_after(0) is None  # nothing written was pushed out
    log.check()


def test_written_audio_pushed_out_is_lost_only_for_a_resume_from_below_it() -> None:
    log = ReplayLog(limit_s=1.0)
    log.add(Input(0, audio=SECOND), written_upto=0)
    assert log.add(Input(0, audio=SECOND), written_upto=1) == []  # 1 reached a connection
    assert log.lost_after(1) is None  # a handle at 1 holds it
    assert log.lost_after(0) == 1.0
    assert log.lost_after(0) is None  # counted once


def test_a_trusted_base_forgets_the_pushed_out_audio_it_covers() -> None:
    log = ReplayLog(limit_s=1.0)
    log.add(Input(0, audio=SECOND), written_upto=0)
    log.add(Input(0, audio=SECOND), written_upto=1)
    log.forget_upto(1)
    assert log.lost_after(0) is None
    assert [i.seq for i in log] == [2]


# ------------------------------------------------------------------------- history


def test_history_joins_a_roles_pieces_and_briefs_the_newest_that_fit() -> None:
    history = History()
    for role, text in [("user", "Hel"), ("user", "lo"), ("model", "Hi there"), ("user", "bye")]:
        history.add(role, text)
    assert history.turns == [("user", "Hello"), ("model", "Hi there"), ("user", "bye")]
    assert history.recent(limit=11) == (("model", "Hi there"), ("user", "bye"))
    assert history.recent(limit=2) == ()


@pytest.mark.parametrize("turns", [70, 200])
def test_history_keeps_a_bounded_number_of_turns(turns: int) -> None:
    history = History()
    for n in range(turns):
        history.add("user" if n % 2 else "model", str(n))
    assert len(history.turns) == 64
    assert history.turns[-1][1] == str(turns - 1)


# ------------------------------------------------------------------ handle placement


def test_a_handle_holds_what_was_written_a_guard_interval_before_it() -> None:
    placement = RoundTripPlacement()
    placement.measured(0.1)
    guard = placement.guard()
    assert guard == pytest.approx(0.155)
    assert placement.covered(5.0) is None and placement.newest() is None
    placement.written(1, 1.0)
    placement.written(2, 1.1)
    placement.written(3, 1.2)
    assert placement.newest() == 3
    assert placement.covered(1.1 + guard - 0.001) == 1  # 2 may still be in flight
    assert placement.covered(1.1 + guard) == 2
    assert placement.covered(9.0) == 3


def test_placement_forgets_writes_it_can_no_longer_use() -> None:
    placement = RoundTripPlacement()
    for seq in range(1, 100):
        placement.written(seq, seq * 0.1)
    # The newest older than the guard of a handle that arrived READ_LAG_S ago, and those
    # after: 2 s of writes every 0.1 s, and the guard's.
    assert len(placement._writes) <= 24
    assert placement.covered(99 * 0.1) == 96  # the guard is 0.23 s at the assumed round trip
    assert placement.covered(10.5) == 99
    # A handle that arrived 1.5 s before the newest write, read only now: placed by then.
    assert placement.covered(99 * 0.1 - 1.5) == 81
    assert placement.newest() == 99


def test_the_held_handle_takes_a_later_one_unless_it_says_no_more_with_more_in_doubt() -> None:
    held = HeldHandle()
    assert held.offer("h1", base=4, replies=1, overlap_s=0.5)
    assert not held.offer("h2", base=4, replies=1, overlap_s=0.8)  # a handle after a replay
    assert (held.handle, held.overlap_s) == ("h1", 0.5)
    assert held.offer("h3", base=4, replies=1, overlap_s=0.2)
    assert held.offer("h4", base=4, replies=2, overlap_s=0.9)  # it holds one more reply
    assert held.offer("h5", base=6, replies=2, overlap_s=1.0)  # it holds more input
    held.refused()
    assert (held.handle, held.base, held.replies) == (None, 6, 2)
    assert held.offer("h6", base=6, replies=2, overlap_s=2.0)  # nothing held: taken


# ---------------------------------------------------------------------- retry budget


def budget(**knobs: float) -> RetryBudget:
    return RetryBudget(LiveSettings(**knobs), random.Random(7))


def test_retries_wait_a_jittered_doubling_delay_up_to_the_cap() -> None:
    retry = budget(backoff_initial_s=0.1, backoff_max_s=0.3, reconnect_max_attempts=50)
    waits: list[float] = []
    for _ in range(6):
        retry.opening(0.0)
        retry.back_off(0.0)
        assert retry.retry_at is not None and not retry.due(retry.retry_at - 1e-9)
        assert retry.due(retry.retry_at)
        waits.append(retry.retry_at)
    caps = [0.1, 0.2, 0.3, 0.3, 0.3, 0.3]
    assert all(0 <= w <= cap for w, cap in zip(waits, caps, strict=True))
    retry.opening(0.0)
    assert retry.retry_at is None and not retry.due(9.0)


def test_the_budget_gives_up_after_its_attempts_naming_the_last_error() -> None:
    retry = budget(reconnect_max_attempts=3, reconnect_total_s=30.0)
    for n in range(3):
        assert retry.exhausted(float(n)) is None
        retry.opening(float(n))
        retry.failed(FailureReason.TIMED_OUT, "no setupComplete in time")
    given_up = retry.exhausted(2.5)
    assert given_up is not None
    reason, detail = given_up
    assert reason is FailureReason.TIMED_OUT
    assert detail == (
        "live service unreachable: 3 attempts in 2.5 s "
        "(last error: timed_out, no setupComplete in time)"
    )


def test_the_budget_gives_up_after_its_time_and_a_working_connection_renews_it() -> None:
    retry = budget(reconnect_max_attempts=100, reconnect_total_s=5.0)
    retry.opening(0.0)
    assert retry.exhausted(5.0) is None
    assert retry.exhausted(5.1) == (
        FailureReason.UNREACHABLE,
        "live service unreachable: 1 attempts in 5.1 s (last error: unreachable, no connection)",
    )
    retry.delivered()
    assert retry.attempts == 0 and retry.exhausted(100.0) is None


def test_a_refused_handle_is_not_a_failed_attempt() -> None:
    retry = budget(reconnect_max_attempts=1)
    retry.opening(0.0)
    retry.handle_refused()
    assert retry.attempts == 0 and retry.exhausted(1.0) is None


# --------------------------------------------------------------------- repeat filter

HEARD = "Our store opens at nine o'clock."


def filter_after_a_resume(judge_s: float = 1.5) -> RepeatFilter:
    """A reply heard in full (the state then held 3 replies), then a resume from 2."""
    repeats = RepeatFilter(judge_s)
    repeats.began(0.0, since_resume_s=100.0)
    repeats.text = HEARD
    assert not repeats.ended(3, 1.0)
    repeats.resumed(2)
    return repeats


def test_a_resumed_models_first_reply_is_held_and_skipped_if_it_repeats() -> None:
    repeats = filter_after_a_resume()
    repeats.began(5.0, since_resume_s=0.2)
    assert repeats.judge_until == 6.5 and repeats.unheard
    repeats.hold(ModelAudio(b"\x00" * 4800, 5.0))
    repeats.text += "Our store"
    assert repeats.judge(final=False) is None  # too few words yet
    repeats.text += " opens at nine"
    assert repeats.judge(final=False) == Repeat(HEARD, 1.0, 0.1)
    assert repeats.skipping == HEARD and repeats.judge_until is None
    repeats.text += " o'clock."
    assert not repeats.diverges()
    assert repeats.ended(4, 6.0)  # skipped: not kept as heard
    assert repeats.skipping is None


def test_a_new_reply_is_released_in_order_and_kept_once_heard() -> None:
    repeats = filter_after_a_resume()
    repeats.began(5.0, since_resume_s=0.2)
    held = [ModelAudio(b"a", 5.0), Transcript("model", "We also deliver on Sundays")]
    for event in held:
        repeats.hold(event)
    repeats.text = "We also deliver on Sundays"
    assert repeats.judge(final=False) is False
    assert repeats.release() == held and not repeats.unheard
    assert not repeats.ended(3, 7.0)
    repeats.resumed(2)  # another resume from before both: either may be said again
    repeats.began(8.0, since_resume_s=0.1)
    repeats.text = "We also deliver on Sundays"
    assert repeats.judge(final=True) == Repeat("We also deliver on Sundays", 7.0, 0.0)


def test_a_skipped_reply_that_parts_from_the_heard_one_is_played_from_there() -> None:
    repeats = filter_after_a_resume()
    repeats.began(5.0, since_resume_s=0.2)
    repeats.text = "Our store opens at nine"
    assert isinstance(repeats.judge(final=False), Repeat)
    repeats.text += " but today we close early because of the storm"
    assert repeats.diverges() and repeats.skipping is None


def test_only_replies_soon_after_a_resume_are_judged_and_judging_can_be_off() -> None:
    late = filter_after_a_resume()
    late.began(9.0, since_resume_s=REPEAT_WINDOW_S + 0.1)
    assert not late.unheard
    late.began(9.5, since_resume_s=0.1)  # the candidates are gone
    assert not late.unheard
    off = filter_after_a_resume(judge_s=0.0)
    off.began(5.0, since_resume_s=0.1)
    assert not off.unheard


def test_replies_the_resumed_state_holds_are_no_candidates() -> None:
    repeats = filter_after_a_resume()
    repeats.resumed(3)  # its state holds the heard reply
    repeats.began(5.0, since_resume_s=0.1)
    assert repeats.judge_until is None


# ---------------------------------------------------------------------------- nudge


def test_a_reply_cut_by_a_reset_is_continued_from_what_the_caller_heard() -> None:
    nudge = Nudge(after_s=1.5)
    nudge.reply_cut("Our opening hours are")
    nudge.resumed(10.0, unanswered=False)
    assert nudge.at == 11.5
    assert nudge.due(11.5, caller_quiet_at=11.9, talking=False) is None
    assert nudge.at == 11.9  # not while the caller speaks
    assert nudge.due(11.9, caller_quiet_at=None, talking=True) is None
    assert nudge.at == pytest.approx(13.4)  # the model is talking (held or skipped)
    text = nudge.due(13.4, caller_quiet_at=None, talking=False)
    assert text is not None and '"Our opening hours are"' in text
    assert nudge.at is None and not nudge.cut


def test_a_prompt_asks_again_when_nothing_of_the_reply_was_heard_or_nothing_was_cut() -> None:
    nudge = Nudge(after_s=1.5)
    nudge.reply_cut("")
    nudge.resumed(0.0, unanswered=False)
    assert nudge.due(1.5, None, False) == CUT_UNHEARD
    nudge.resumed(2.0, unanswered=False)
    assert nudge.at is None  # nothing cut, nothing unanswered
    nudge.resumed(2.0, unanswered=True)
    assert nudge.due(3.5, None, False) == DROPPED


def test_words_the_caller_hears_call_the_prompt_off() -> None:
    nudge = Nudge(after_s=1.5)
    nudge.reply_cut("Our opening")
    nudge.resumed(0.0, unanswered=True)
    nudge.heard()
    assert nudge.at is None and not nudge.cut


def test_a_skipped_repeat_is_prompted_only_if_the_caller_spoke_after_hearing_it() -> None:
    nudge = Nudge(after_s=1.5)
    nudge.resumed(0.0, unanswered=True)
    nudge.repeat_skipped(caller_spoke_after=False, began_at=0.5)
    assert nudge.at is None  # the caller had this answer already
    nudge.repeat_skipped(caller_spoke_after=True, began_at=0.5)
    assert nudge.at == 2.0


# ------------------------------------------------------------------- goAway switch


def test_a_goaway_switch_waits_for_a_clean_moment_until_its_deadline() -> None:
    switch = GoAwaySwitch(margin_s=1.0)
    assert not switch.due(0.0, clean=True)  # no goAway: no switch
    switch.announced(ends_at=10.0, now=2.0)
    assert switch.deadline == 9.0
    assert not switch.due(8.9, clean=False) and switch.due(8.9, clean=True)
    assert switch.due(9.0, clean=False)
    switch.made(clean=False)
    assert switch.forced and switch.deadline is None
    switch.announced(ends_at=2.5, now=2.0)  # nearer than the margin: at once
    assert switch.deadline == 2.0 and not switch.forced


def test_a_refused_second_connection_makes_switches_break_before_make() -> None:
    switch = GoAwaySwitch(margin_s=1.0)
    assert switch.mode is SwitchMode.MAKE_BEFORE_BREAK
    switch.second_connection_refused()
    assert switch.mode is SwitchMode.BREAK_BEFORE_MAKE


# -------------------------------------------------------------------------- outage


def test_an_outage_runs_from_the_first_loss_and_counts_once_by_cause() -> None:
    outage = Outage()
    assert outage.gap(5.0) == 0.0
    outage.lost(1.0, ResetCause.ABRUPT)
    outage.lost(1.5, ResetCause.GOAWAY)  # a retry: the outage began at the first loss
    assert outage.cause is ResetCause.GOAWAY and outage.gap(2.0) == 1.0
    assert outage.counted(ResetCause.ABRUPT) is ResetCause.ABRUPT
    outage.over()
    assert outage.cause is None and outage.lost_at is None
    outage.handle_refused = True
    assert outage.counted(ResetCause.GOAWAY) is ResetCause.REFUSED
    assert outage.counts[ResetCause.ABRUPT] == outage.counts[ResetCause.REFUSED] == 1


# --------------------------------------------------------------------------- turns


def test_the_caller_speaks_until_a_pause_and_waits_for_an_answer() -> None:
    turns = Turns(pause_s=0.4)
    assert not turns.caller_speaking(0.0) and turns.caller_pause_at() is None
    turns.caller_spoke(1.0)
    assert turns.caller_speaking(1.39) and not turns.caller_speaking(1.41)
    assert turns.caller_pause_at() == pytest.approx(1.4)
    assert turns.unanswered
    turns.reply_began(2.0)
    assert not turns.unanswered and turns.state is TurnState.MODEL_SPEAKING
    turns.interrupted()
    assert turns.state is TurnState.CALLER_SPEAKING
    turns.idle()
    assert turns.state is TurnState.IDLE


# ---------------------------------------------------------------------- loop lag


def test_loop_lag_is_the_most_around_a_moment() -> None:
    lag = LoopLag()
    assert lag.around(0.0) == 0.0
    lag.note(1.0, 0.03)
    lag.note(1.05, 0.01)
    lag.note(1.5, 0.02)
    assert lag.around(1.02) == 0.03  # the busy stretch that ended at 1.0
    assert lag.around(1.12) == 0.01
    assert lag.around(1.3) == 0.0  # no timer ran late near it
    lag.note(3.2, 0.0)
    assert lag.around(1.0) == 0.0  # more than WINDOW_S ago: forgotten


async def test_loop_lag_sees_a_blocked_loop_and_stops_with_its_last_holder() -> None:
    shared = loop_lag()
    assert loop_lag() is shared
    async with shared.hold(), shared.hold():
        await asyncio.sleep(0.03)
        busy_until = time.monotonic() + 0.08  # the loop is busy: the timer due runs late
        while time.monotonic() < busy_until:
            pass
        await asyncio.sleep(0.03)
        assert 0.05 <= shared.around(time.monotonic()) <= 1.0
    tasks = [t for t in asyncio.all_tasks() if t.get_name() == "loop-lag"]
    assert not tasks
