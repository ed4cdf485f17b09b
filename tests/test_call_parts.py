"""The call's parts on their own: playback accounting (`gateway.playback`) and the one
decision every ending goes through (`gateway.ending`)."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.ending import (
    CallOutcome,
    Ending,
    EndReason,
    Finish,
    Prelude,
    answer_ending,
    answered_by_kind,
)
from gateway.playback import UNSEEN_TURN_RECHECK_S, Changes, Playback, Speaker
from gateway.watch import Move

# ---------------------------------------------------------------------------- playback


def test_a_reply_is_heard_when_its_mark_comes_back() -> None:
    p = Playback()
    assert p.end_reply() is None  # nothing played: no mark
    assert p.audio(1.0) and not p.audio(1.1)  # the first piece begins the turn
    assert p.playing(model_speaking=False)
    name = p.end_reply()
    assert name == "reply-1" and p.end_reply() is None  # one mark per reply
    assert p.playing(model_speaking=False)  # sent, not yet heard
    assert not p.mark("reply-7")  # not ours
    assert p.mark(name) and p.replies_heard == 1 and p.replies_sent == 1
    assert not p.playing(model_speaking=False)
    assert p.playing(model_speaking=True)


def test_a_mark_while_the_next_reply_plays_is_not_all_heard() -> None:
    p = Playback()
    p.audio(0.0)
    first = p.end_reply()
    assert first is not None
    p.audio(0.5)  # the next reply is already on its way
    assert not p.mark(first) and p.replies_heard == 1


def test_after_clear_the_dropped_replies_marks_do_not_count_as_heard() -> None:
    p = Playback()
    p.audio(0.0)
    name = p.end_reply()
    assert name is not None
    p.cleared()  # Twilio echoes the mark of the reply it dropped
    assert not p.mark(name) and p.replies_heard == 0
    assert not p.playing(model_speaking=False)


def test_a_wait_settles_a_second_after_the_models_last_audio() -> None:
    p = Playback()
    wait = p.wait(10.0, settle_s=1.0)
    assert p.heard(wait, 10.2, model_speaking=False) == (False, 11.0)
    p.audio(10.5)  # the model answers the tool response
    name = p.end_reply()
    assert name is not None
    assert p.heard(wait, 11.2, model_speaking=False) == (False, 11.5)
    assert p.mark(name)
    assert p.heard(wait, 11.2, model_speaking=False) == (False, 11.5)
    assert p.heard(wait, 11.5, model_speaking=False) == (True, None)


def test_a_completed_turn_ends_a_wait_once_it_was_heard() -> None:
    p = Playback()
    wait = p.wait(0.0, settle_s=1.0)
    p.audio(0.1)
    name = p.end_reply()
    p.turn_complete()
    assert name is not None
    assert p.heard(wait, 0.3, model_speaking=False) == (False, None)  # only the mark tells
    p.mark(name)
    assert p.heard(wait, 0.3, model_speaking=False) == (True, None)


def test_an_instructions_wait_takes_only_a_turn_begun_after_it_was_sent() -> None:
    p = Playback()
    p.audio(1.0)  # the model was still finishing an earlier turn
    wait = p.wait(2.0, settle_s=1.0, turn_after=1.5)
    p.end_reply()
    p.turn_complete()
    assert p.mark("reply-1")
    assert p.heard(wait, 9.0, model_speaking=False) == (False, None)
    p.audio(2.5)
    p.end_reply()
    p.turn_complete()
    assert p.heard(wait, 9.0, model_speaking=False) == (False, None)  # not heard yet
    assert p.mark("reply-2")
    assert p.heard(wait, 9.0, model_speaking=False) == (True, None)


def test_a_turn_the_session_plays_unseen_is_looked_at_again_soon() -> None:
    p = Playback()
    wait = p.wait(0.0, settle_s=5.0, turn_after=0.0)
    assert p.heard(wait, 1.0, model_speaking=True) == (False, 1.0 + UNSEEN_TURN_RECHECK_S)
    p.audio(1.0)  # the call sees the turn: its end will come as an event
    assert p.heard(wait, 1.0, model_speaking=True) == (False, None)


def test_a_cut_turn_does_not_count_as_completed() -> None:
    p = Playback()
    wait = p.wait(0.0, settle_s=1.0, turn_after=0.0)
    p.audio(0.5)
    p.turn_cut()
    assert not p.in_turn
    p.turn_complete()  # a turn with no audio of its own
    assert p.heard(wait, 3.0, model_speaking=False)[0] is False


async def test_every_waiter_wakes_on_one_change() -> None:
    changes = Changes()
    waiters = [asyncio.create_task(changes.wait(None)) for _ in range(3)]
    await asyncio.sleep(0)
    changes.notify()
    await asyncio.wait_for(asyncio.gather(*waiters), 5)


async def test_the_speaker_marks_each_reply_and_a_wait_ends_on_the_mark() -> None:
    sent: list[str] = []

    async def send(text: str) -> None:
        sent.append(text)

    delays: list[float] = []
    speaker = Speaker(send, "MZ1", lambda: False, wait_limit_s=30.0, on_sent=delays.append)
    await speaker.play(b"\x00\x01" * 2400, 0.0)  # 50 ms of 24 kHz PCM
    waiting = asyncio.create_task(speaker.wait_heard(settle_s=30.0))
    await asyncio.sleep(0)  # the wait begins before the turn ends
    await speaker.end_reply()
    speaker.turn_complete()
    events = [json.loads(text)["event"] for text in sent]
    assert events[0] == "media" and events[-1] == "mark"
    assert not waiting.done()
    assert speaker.mark("reply-1")
    assert await asyncio.wait_for(waiting, 5) is True
    assert delays and speaker.state.replies_heard == 1


async def test_a_turn_the_session_ends_without_an_event_still_ends_the_wait() -> None:
    """A held or skipped repeat: the session says the model speaks, the call sees no audio
    and gets no event when it stops; the wait notices by looking again."""

    async def send(text: str) -> None:
        pass

    speaking = [True]
    speaker = Speaker(send, "MZ1", lambda: speaking[0], wait_limit_s=30.0, on_sent=lambda _: None)
    waiting = asyncio.create_task(speaker.wait_quiet())
    await asyncio.sleep(2 * UNSEEN_TURN_RECHECK_S)
    assert not waiting.done()
    speaking[0] = False  # no notify: nothing tells the call
    await asyncio.wait_for(waiting, 5)


async def test_a_wait_gives_up_at_its_limit() -> None:
    async def send(text: str) -> None:
        pass

    speaker = Speaker(send, "MZ1", lambda: False, wait_limit_s=0.05, on_sent=lambda _: None)
    await speaker.play(b"\x00\x01" * 2400, 0.0)
    await speaker.end_reply()  # its mark never comes back
    assert await speaker.wait_heard() is False


# ------------------------------------------------------------------------------ ending


def test_the_first_reason_stands() -> None:
    ending = Ending()
    plan = ending.begin(EndReason.END_CALL)
    assert plan is not None and plan.prelude is Prelude.LAST_WORDS
    assert plan.finish is Finish.TOOL
    assert ending.begin(EndReason.SILENCE, "Goodbye.") is None
    assert ending.begin(EndReason.FAX) is None
    assert ending.ended_by is EndReason.END_CALL and ending.outcome is None


def test_the_duration_limit_hangs_up_even_while_the_call_is_ending() -> None:
    ending = Ending()
    assert ending.begin(EndReason.MAX_DURATION, "Please wrap up.") is not None
    plan = ending.begin(EndReason.DURATION_LIMIT)
    assert plan is not None and plan.prelude is Prelude.NOTHING
    assert plan.finish is Finish.HANG_UP
    assert ending.ended_by is EndReason.MAX_DURATION  # why the ending began


@pytest.mark.parametrize(
    ("reason", "prelude"),
    [
        (EndReason.SILENCE, Prelude.SAY),
        (EndReason.MAX_DURATION, Prelude.SAY),
        (EndReason.MAX_TOKENS, Prelude.SAY),
        (EndReason.VOICEMAIL, Prelude.SAY_NOW),
        (EndReason.MACHINE, Prelude.NOTHING),
        (EndReason.FAX, Prelude.NOTHING),
    ],
)
def test_the_gateways_own_endings_hang_up_after_their_prelude(
    reason: EndReason, prelude: Prelude
) -> None:
    plan = Ending().begin(reason, "words")
    assert plan is not None and (plan.prelude, plan.finish, plan.say) == (
        prelude,
        Finish.HANG_UP,
        "words",
    )


@pytest.mark.parametrize(
    "reason",
    [
        EndReason.COMPLETED,
        EndReason.HANGUP,
        EndReason.LIVE_FAILED,
        EndReason.PROTOCOL_ERROR,
        EndReason.SHUTDOWN,
    ],
)
def test_the_line_going_away_ends_the_call_at_once_whatever_else(reason: EndReason) -> None:
    ending = Ending()
    assert ending.begin(EndReason.TRANSFER) is not None
    plan = ending.begin(reason)
    assert plan is not None and plan.finish is Finish.NONE
    assert ending.outcome is CallOutcome(reason.value)
    assert ending.ended_by is EndReason.TRANSFER
    assert ending.begin(EndReason.DURATION_LIMIT) is None  # over: nothing more begins
    ending.closed()
    assert ending.outcome is CallOutcome(reason.value)


def test_a_call_the_caller_ended_was_not_ended_by_the_gateway() -> None:
    ending = Ending()
    assert ending.begin(EndReason.HANGUP) is not None
    assert ending.ended_by is None and ending.outcome is CallOutcome.HANGUP


def test_a_stream_closed_in_a_shutdown_is_a_shutdown() -> None:
    ending = Ending()
    ending.shutting_down = True
    ending.begin(EndReason.HANGUP)
    assert ending.outcome is CallOutcome.SHUTDOWN


def test_the_gateway_closing_the_stream_is_its_outcome() -> None:
    ending = Ending()
    ending.begin(EndReason.END_CALL)
    ending.closed()  # the REST hang-up failed
    assert ending.outcome is CallOutcome.ENDED_BY_GATEWAY
    assert ending.begin(EndReason.COMPLETED) is None


def test_every_reason_has_a_plan_and_every_ending_move_is_a_reason() -> None:
    for reason in EndReason:
        assert Ending().begin(reason) is not None, reason
    ending_moves = {move.value for move in Move if move is not Move.CHECK_IN}
    assert ending_moves <= {reason.value for reason in EndReason}


@pytest.mark.parametrize(
    ("answered_by", "voicemail", "reason"),
    [
        ("human", "Hi", None),
        ("unknown", "Hi", None),
        ("machine_end_beep", "Hi", EndReason.VOICEMAIL),
        ("machine_start", "", EndReason.MACHINE),
        ("fax", "Hi", EndReason.FAX),
    ],
)
def test_who_answered_decides_the_ending(
    answered_by: str, voicemail: str, reason: EndReason | None
) -> None:
    assert answer_ending(answered_by_kind(answered_by), voicemail) is reason
