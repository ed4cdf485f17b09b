"""Session survival: calls outlive announced and abrupt Live connection resets.

The emulator's connections live a few seconds here, so a call of a dozen
turns crosses many resets. What the emulator's session holds at the end is
compared with what the caller said: every utterance once, nothing lost,
nothing doubled.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from survival_helpers import (
    CALLER_FREQS,
    SPEED,
    UTTERANCE_S,
    assert_replies_once_in_order,
    assert_session_holds_caller_audio,
    converse,
    live_session,
    reset_problems,
    sent_bytes,
)

from gateway.live.session import RESUMES_KEPT
from gateway.testing.analysis import HeardReply, await_reply, heard_playings
from gateway.testing.harness import quick_emulator, test_bed
from gateway.testing.live_emulator import EmulatorConfig, EmulatorRecord
from gateway.testing.twilio_sim import SimulatedCall


def test_a_repeat_the_caller_talked_over_is_not_a_reply_left_unsaid() -> None:
    """Python 3.12 saw this: reply 5 cut after 0.72 s (heard: the caller talks on), the
    resumed model says it again from the top, the caller's words cut that short, reply 6."""
    heard = [(1, 0.82), (2, 0.42), (2, 0.82), (3, 0.84), (4, 0.82), (5, 0.72), (5, 0.30)]
    replies = [HeardReply(n, 2.0 * i, s) for i, (n, s) in enumerate([*heard, (6, 0.82)])]
    assert_replies_once_in_order(replies, 6)
    # Cut before the caller had heard enough of it, and followed by another reply: caught.
    other = [HeardReply(n, 10.0 + 2 * i, s) for i, (n, s) in enumerate(((5, 0.4), (6, 0.3)))]
    again = [HeardReply(5, 14.0, 0.82), HeardReply(6, 16.0, 0.82)]
    with pytest.raises(AssertionError):
        assert_replies_once_in_order([*replies[:5], *other, *again], 6)


def survival_config(**overrides: object) -> EmulatorConfig:
    return quick_emulator(**{"speed": SPEED, "handle_interval": 0.4, **overrides})


def assert_every_setup_resumed(record: EmulatorRecord) -> None:
    """One session throughout: every connection after the first that sent a setup resumed.
    (A connection closed before its setup, e.g. a reconnect the hang-up cancelled, is none.)"""
    assert len(record.sessions) == 1, list(record.sessions)
    fresh = [c for c in record.connections[1:] if c.setup and c.resumed_from is None]
    assert not fresh, fresh


@pytest.mark.per_profile()
async def test_call_across_goaway_resets_loses_nothing() -> None:
    turns = 10
    config = survival_config(lifetime=1.8, goaway_lead=0.9)
    async with test_bed(config) as bed:
        call = await bed.caller(speed=SPEED).place_call()
        live = await live_session(bed)
        await converse(call, turns)
        await call.hangup()
        await asyncio.sleep(0.1)

        record = bed.emulator.record
        goaways = [e for e in record.events if e[1] == "goaway"]
        assert len(goaways) >= 5, len(goaways)
        assert_every_setup_resumed(record)
        assert not any(c.refused for c in record.connections)
        assert_replies_once_in_order(heard_playings(call.record), turns)
        assert_session_holds_caller_audio(bed, call, turns, live)
        resumed = bed.metrics.registry.get_sample_value
        assert resumed("gateway_live_resumptions_total", {"cause": "goaway"}) >= 5


@pytest.mark.per_profile()
async def test_call_across_abrupt_resets_loses_nothing() -> None:
    turns = 10
    config = survival_config(abrupt_after=1.6, abrupt_jitter=0.8, seed=7)
    async with test_bed(config) as bed:
        call = await bed.caller(speed=SPEED).place_call()
        live = await live_session(bed)
        await converse(call, turns)
        await call.hangup()
        await asyncio.sleep(0.1)

        record = bed.emulator.record
        abrupt = [e for e in record.events if e[1] == "close" and "abrupt" in e[2]]
        assert len(abrupt) >= 5, len(abrupt)
        assert_every_setup_resumed(record)
        assert_replies_once_in_order(heard_playings(call.record), turns)
        assert_session_holds_caller_audio(bed, call, turns, live)
        resumed = bed.metrics.registry.get_sample_value
        assert resumed("gateway_live_resumptions_total", {"cause": "abrupt"}) >= 5


@pytest.mark.per_profile("gemini-3.1-flash-live-preview")
async def test_refused_handle_continues_on_a_briefed_fresh_session(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = survival_config()
    async with test_bed(config) as bed:
        call = await bed.caller(speed=SPEED).place_call()
        await converse(call, 2)
        # The service forgets every handle (as after their expiry), then the line drops.
        bed.emulator.config.handle_ttl = 0.0
        with caplog.at_level(logging.WARNING, logger="gateway.live.session"):
            await bed.emulator.cut_all(abrupt=True)
            await converse_from(call, 3)
        await call.hangup()

        sessions = list(bed.emulator.record.sessions.values())
        assert len(sessions) == 2
        fresh = sessions[1]
        # Briefed with the conversation so far: both earlier replies' transcripts.
        briefing = " ".join(text for _, text in fresh.history_text)
        assert "reply 1" in briefing and "reply 2" in briefing, fresh.history_text
        resumed = bed.metrics.registry.get_sample_value
        assert resumed("gateway_live_resumptions_total", {"cause": "refused"}) == 1
        refusals = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 1


async def test_outage_longer_than_the_bound_ends_the_call_with_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with test_bed(survival_config(), reconnect_total_s=1.5) as bed:
        call = await bed.caller(speed=SPEED).place_call()
        await converse(call, 1)
        bed.emulator.refuse_connections(until=time.monotonic() + 3600)
        with caplog.at_level(logging.INFO):
            await bed.emulator.cut_all(abrupt=True)
            loop = asyncio.get_running_loop()
            started = loop.time()
            while not call.closed:
                assert loop.time() - started < 10
                await call.silence(0.1)
        assert call.record.close_code == 1011
        messages = [r.getMessage() for r in caplog.records]
        reasons = [m for m in messages if "live session failed" in m]
        assert len(reasons) == 1 and "unreachable" in reasons[0]
        assert not [r for r in caplog.records if r.exc_info]


async def test_many_calls_resetting_at_once_all_resume() -> None:
    calls_n = 8
    async with test_bed(survival_config()) as bed:
        callers = [await bed.caller(speed=SPEED).place_call() for _ in range(calls_n)]
        await asyncio.gather(*(converse_from(c, 1) for c in callers))
        await bed.emulator.cut_all(abrupt=True)  # the service restarts
        await asyncio.gather(*(converse_from(c, 2) for c in callers))
        for c in callers:
            await c.hangup()
        resumed = bed.metrics.registry.get_sample_value
        assert resumed("gateway_live_resumptions_total", {"cause": "abrupt"}) == calls_n
        assert len(bed.emulator.record.sessions) == calls_n


async def converse_from(call: SimulatedCall, n: int) -> None:
    """Say something and keep the line open until reply n was heard in full. (In playings:
    eight calls setting up or resuming at once in one event loop can stall playback.)"""
    await call.speak_tone(CALLER_FREQS[0], UTTERANCE_S)
    await await_reply(call, n, min_s=0.7, limit_s=20, read=heard_playings)


async def test_goaway_when_the_service_refuses_a_second_connection() -> None:
    """Some deployments refuse to resume while the old connection is open: break, then make."""
    turns = 6
    config = survival_config(lifetime=1.8, goaway_lead=0.9, concurrent_resume="refuse")
    async with test_bed(config) as bed:
        call = await bed.caller(speed=SPEED).place_call()
        live = await live_session(bed)
        await converse(call, turns)
        await call.hangup()
        await asyncio.sleep(0.1)
        record = bed.emulator.record
        assert len([e for e in record.events if e[1] == "goaway"]) >= 3
        assert_replies_once_in_order(heard_playings(call.record), turns)
        assert_session_holds_caller_audio(bed, call, turns, live)


async def test_hour_long_call_stays_up() -> None:
    """Sixty minutes of call time, compressed: hundreds of turns, dozens of resets of both
    kinds (goAway every few seconds, abrupt cuts in between), one session throughout."""
    speed = 40.0
    call_s = 3600.0
    config = survival_config(
        speed=speed,
        lifetime=3.0,
        goaway_lead=1.0,
        handle_interval=0.1,
        reply_s=3.0,
        end_of_speech_s=0.6,
        response_delay_s=0.3,
        record_audio=False,
    )
    # The gateway's own timing knobs are compressed like the call's.
    async with test_bed(config, goaway_margin_s=0.1, caller_pause_s=0.4 / speed) as bed:
        call = await bed.caller(speed=speed).place_call()
        live = await live_session(bed)
        loop = asyncio.get_running_loop()
        turns = 0
        next_cut = loop.time() + 4.5
        while len(call.record.sent_ulaw) < call_s * 8000:
            turns += 1
            before = len(call.record.marks_echoed)
            await call.speak_tone(CALLER_FREQS[turns % 4], 2.0)
            deadline = loop.time() + 10
            while len(call.record.marks_echoed) == before:
                assert loop.time() < deadline, (
                    f"turn {turns}: no reply heard; emulator: {bed.emulator.record.events[-12:]}"
                    f"; call: {call.record.events[-8:]}"
                )
                assert not call.closed, f"call dropped at turn {turns}"
                await call.silence(0.5)
            await call.silence(0.5)
            if loop.time() > next_cut:
                await bed.emulator.cut_all(abrupt=True)
                next_cut = loop.time() + 4.5
        await call.hangup()

        record = bed.emulator.record
        goaways = len([e for e in record.events if e[1] == "goaway"])
        abrupt = len([e for e in record.events if e[1] == "close" and "abrupt" in e[2]])
        assert turns >= 300
        assert goaways >= 12 and abrupt >= 12, (goaways, abrupt)
        assert len(record.sessions) == 1
        session = next(iter(record.sessions.values()))
        assert session.state.model_turns >= turns
        # At no reset is the caller's audio missing, nor sent twice beyond what the gateway
        # reported; the session holds all of it, once but for that.
        assert len(live.resumes) < RESUMES_KEPT
        sent = sent_bytes(bed, call)  # less the silence withheld on purpose
        problems = reset_problems(record, live.resumes, session.state.audio_bytes, sent)
        assert not problems, problems
        heard_s = sum(len(h.ulaw) for h in call.record.heard) / 8000
        assert heard_s >= 0.95 * turns * 3.0
