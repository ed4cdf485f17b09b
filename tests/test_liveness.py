"""Liveness of the Live connection: judged from anything received, never from a pong in time.

Real gateway, real google-genai SDK over TLS, the Live emulator playing a stalled service and
late pongs (`pong_delay`), the Twilio simulator calling.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import pytest
from survival_helpers import (
    CALLER_FREQS,
    FULL_REPLY_S,
    UTTERANCE_S,
    assert_replies_once_in_order,
    assert_session_holds_caller_audio,
    live_session,
    sent_bytes,
)

from gateway.live import sdk
from gateway.live.handles import (
    DEFAULT_RTT_S,
    GUARD_MARGIN_S,
    RTT_SAMPLES,
    RoundTripPlacement,
)
from gateway.live.liveness import UNACKED_S
from gateway.server import live_http
from gateway.testing.analysis import await_reply, heard_playings, heard_replies
from gateway.testing.harness import quick_emulator, test_bed, test_settings
from gateway.testing.peers import say_and_hear
from gateway.testing.twilio_sim import SimulatedCall

if TYPE_CHECKING:
    from conftest import Eventually, LogCapture

SPEED = 2.0


def replies_heard(call: SimulatedCall) -> list[int]:
    total: dict[int, float] = {}
    for reply in heard_replies(call.record):
        total[reply.n] = total.get(reply.n, 0.0) + reply.duration_s
    return [n for n, heard_s in total.items() if heard_s >= 0.7]


def test_handles_are_placed_from_the_tighter_bound_on_the_round_trip() -> None:
    quick, slow = RoundTripPlacement(), RoundTripPlacement()
    quick.setup(0.04)  # a setup answered in 40 ms: the data path is no slower
    slow.setup(0.5)  # the service's setup work on top: no better than the default
    assert (quick.rtt, slow.rtt) == (0.04, DEFAULT_RTT_S)
    slow.measured(0.03)  # a prompt pong
    quick.measured(0.3)  # a pong slower than the setup's answer: the pong was held up
    assert (quick.rtt, slow.rtt) == (0.04, 0.03)
    slow.measured(0.045)  # a sample taken while the event loop lagged does not widen it
    assert slow.rtt == 0.03 and slow.guard() == pytest.approx(1.5 * 0.03 + GUARD_MARGIN_S)
    for _ in range(RTT_SAMPLES):  # the latest samples only: a slower path is followed
        slow.measured(0.06)
    assert slow.rtt == 0.06


def test_the_sdk_hands_the_keepalive_setting_to_websockets() -> None:
    args = live_http(test_settings("key")).async_client_args
    assert args == {
        "ping_interval": None,
        "compression": None,
        "create_connection": sdk.TimedSocket,
    }
    assert sdk.passes_socket_args(args)


async def test_a_connection_that_sends_nothing_more_is_resumed_after_the_stall_limit(
    logs: LogCapture, eventually: Eventually
) -> None:
    async with test_bed(quick_emulator(SPEED), live_stall_s=1.0) as bed:
        emulator = bed.emulator
        call = await bed.caller(speed=SPEED).place_call()
        await say_and_hear(call, 1)
        [stalled] = emulator.open_connections()
        assert emulator.stall(stalled)
        since = time.monotonic()
        await eventually(lambda: stalled not in emulator.open_connections(), limit_s=5)
        noticed_s = time.monotonic() - since
        await say_and_hear(call, 2, freq=380.0)
        await call.hangup()

        assert replies_heard(call) == [1, 2]
        assert noticed_s >= 1.0  # not before the limit: a pong or a message was due
        assert logs.messages("gateway.live.session", "live: connection lost (nothing received")
        resumed = bed.metrics.registry.get_sample_value(
            "gateway_live_resumptions_total", {"cause": "abrupt"}
        )
        assert resumed == 1
        logs.assert_quiet()


async def test_a_dead_path_is_noticed_by_what_goes_unacknowledged(
    logs: LogCapture, eventually: Eventually
) -> None:
    """The path to the service dies without a word (the emulator's `cut_path`: it neither
    reads nor sends, its socket left open). With the stall limit at 60 s, nothing received
    would tell for a minute; but the caller's audio and the pings go unacknowledged, and the
    kernel ends the connection `UNACKED_S` later: resumed on a new one, the audio replayed."""
    async with test_bed(quick_emulator(SPEED), live_stall_s=60.0) as bed:
        emulator = bed.emulator
        call = await bed.caller(speed=SPEED).place_call()
        await say_and_hear(call, 1)
        [cut] = emulator.open_connections()
        assert emulator.cut_path(cut)
        since = time.monotonic()
        # More than the window the path had left (its receive buffer was full size): the
        # window closes, and what is written after it waits unacknowledged.
        await call.speak_tone(380.0, 8.0)
        sample = bed.metrics.registry.get_sample_value
        while sample("gateway_live_resumptions_total", {"cause": "abrupt"}) != 1:
            assert time.monotonic() - since < 50.0, "the dead path was never noticed"
            await call.silence(0.5)  # the line stays open, as Twilio keeps it
        noticed_s = time.monotonic() - since
        await await_reply(call, 2, min_s=0.7, limit_s=15)
        await call.hangup()

        assert replies_heard(call) == [1, 2]
        assert UNACKED_S <= noticed_s < 60.0, noticed_s  # the kernel's, not the stall limit
        assert len(bed.emulator.record.connections) == 2
        lost = logs.messages("gateway.live.session", "live: connection lost")
        assert len(lost) == 1, lost
        logs.assert_quiet()


async def test_a_call_whose_pongs_come_25_s_late_keeps_its_connection_and_its_audio() -> None:
    """websockets' keepalive would cut this connection 40 s in (a ping at 20 s, 20 s without
    its pong); the gateway hears its messages and keeps it until its goAway, 44 s in. No
    pong measures the round trip (0.1 s here, the uplink's): the setup's places the handle
    the switch resumes from, so nothing is lost, and what is sent twice stays within the
    guard (1.5 round trips, `gateway.live.machine`) and the last piece of caller audio."""
    uplink_s = 0.1
    config = quick_emulator(
        SPEED,
        handle_interval=0.4,
        pong_delay=(25.0, 25.0),
        input_delay=uplink_s,
        lifetime=44.0,
        goaway_lead=2.0,
    )
    async with test_bed(config) as bed:
        call = await bed.caller(speed=SPEED).place_call()
        live = await live_session(bed)
        started = time.monotonic()
        turns = 0
        while time.monotonic() - started < 47.0:
            turns += 1
            await call.speak_tone(CALLER_FREQS[turns % len(CALLER_FREQS)], UTTERANCE_S)
            await await_reply(call, turns, min_s=FULL_REPLY_S, limit_s=20, read=heard_playings)
            await call.silence(0.2)
        await call.hangup()
        await asyncio.sleep(2 * uplink_s)  # what was in flight reaches the service

        connections = bed.emulator.record.connections
        assert len(connections) == 2, [(c.close_kind, c.close_code) for c in connections]
        first = connections[0]
        assert first.closed_at is not None and first.closed_at - first.opened_at > 42.0
        resumed = bed.metrics.registry.get_sample_value
        assert resumed("gateway_live_resumptions_total", {"cause": "goaway"}) == 1
        assert resumed("gateway_live_resumptions_total", {"cause": "abrupt"}) is None
        assert_replies_once_in_order(heard_playings(call.record), turns)
        assert_session_holds_caller_audio(bed, call, turns, live)
        # 16-kHz PCM the session holds beyond what was sent (silence withheld on purpose
        # aside): what the switch sent twice (or, below zero, the tail of the call still in
        # the gateway at the hang-up).
        [session] = bed.emulator.record.sessions.values()
        twice_s = (len(session.audio) - sent_bytes(bed, call)) / 32000
        assert -0.1 <= twice_s <= 1.5 * uplink_s + 0.05, twice_s
