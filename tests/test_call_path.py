"""End to end: simulated Twilio caller -> real gateway -> real SDK -> Live emulator."""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING

import aiohttp
import pytest
from survival_helpers import sent_bytes
from twilio.request_validator import RequestValidator

from gateway.testing.analysis import await_reply, heard_replies, segments, timeline
from gateway.testing.harness import AUTH_TOKEN, PUBLIC_URL, TestBed, quick_emulator, test_bed
from gateway.testing.live_emulator import EmulatorConfig
from gateway.testing.twilio_sim import SimulatedCall

if TYPE_CHECKING:
    from conftest import NewTasks

pytestmark = pytest.mark.usefixtures("no_gemini_base_url")
SPEED = 2.0


def fast_config(**overrides: object) -> EmulatorConfig:
    return quick_emulator(**{"speed": SPEED, **overrides})


async def wait_reply(call: SimulatedCall, n: int, limit_s: float = 15.0) -> None:
    """Keep streaming silence, as Twilio does, until reply n has been heard in full."""
    await await_reply(call, n, min_s=0.7, limit_s=limit_s)


async def test_three_turn_call_hears_every_reply_once_in_order() -> None:
    async with test_bed(fast_config()) as bed:
        call = await bed.caller(speed=SPEED).place_call()
        for n in (1, 2, 3):
            await call.speak_tone(300.0 + 40 * n, 0.6)
            await wait_reply(call, n)
        await call.silence(0.3)
        await call.hangup()
        await asyncio.sleep(0.2)

        replies = [r.n for r in heard_replies(call.record)]
        assert replies == [1, 2, 3]
        sessions = list(bed.emulator.record.sessions.values())
        assert len(sessions) == 1
        # Every caller byte reached the model (at 16 kHz: 1 mu-law byte -> 2 PCM samples)
        # but the silence the gateway withheld on purpose (SILENCE_SUPPRESSION).
        sent = sent_bytes(bed, call)
        held = len(sessions[0].audio)
        assert abs(held - sent) <= 0.02 * sent, (held, sent)
        assert call.record.protocol_errors == []


async def test_setup_asks_for_compression_resumption_and_16k_audio() -> None:
    async with test_bed(fast_config()) as bed:
        call = await bed.caller(speed=SPEED).place_call()
        await call.speak_tone(350.0, 0.5)
        await wait_reply(call, 1)
        await call.hangup()
        setup = bed.emulator.record.connections[0].setup
        text = json.dumps(setup)
        assert "contextWindowCompression" in text or "context_window_compression" in text
        assert "slidingWindow" in text or "sliding_window" in text
        assert "sessionResumption" in text or "session_resumption" in text
        assert "inputAudioTranscription" in text or "input_audio_transcription" in text
        assert setup["model"].endswith(bed.settings.gemini_model)
        # The emulator refuses any input rate but 16 kHz (close 1007); it held our audio.
        assert len(bed.emulator.record.connections) == 1
        assert next(iter(bed.emulator.record.sessions.values())).state.audio_bytes > 0
        # The caller heard the reply at the pitch the emulator sent: 24 kHz -> 8 kHz kept it.
        assert heard_replies(call.record)[0].n == 1


async def test_barge_in_clears_at_once_and_old_reply_stops() -> None:
    config = fast_config(reply_s=3.0, speed=1.0)
    async with test_bed(config) as bed:
        call = await bed.caller(speed=1.0).place_call()
        await call.speak_tone(320.0, 0.5)
        await await_reply(call, 1, min_s=0.5, limit_s=10, step_s=0.05)
        await call.speak_tone(320.0, 0.6)  # talk over the bot
        await wait_reply(call, 2)
        await call.hangup()

        interrupted = [t for t, kind, _ in bed.emulator.record.events if kind == "interrupted"]
        assert len(interrupted) == 1
        assert call.record.clears, "gateway never sent clear"
        clear_at = call.record.clears[0]
        assert 0 <= clear_at - interrupted[0] < 0.1, clear_at - interrupted[0]
        # What the caller heard of reply 1 after the model said `interrupted`: at most 200 ms.
        first = heard_replies(call.record)[0]
        assert first.n == 1 and first.duration_s < 3.0 - 0.5
        origin = next(t for t, kind, _ in call.record.events if kind == "start_tx")
        after = first.start_s + first.duration_s - (interrupted[0] - origin)
        assert after <= 0.2, after


async def _signed_stream(bed: TestBed) -> aiohttp.ClientWebSocketResponse:
    url = PUBLIC_URL.replace("https://", "wss://") + "/twilio/media"
    signature = RequestValidator(AUTH_TOKEN).compute_signature(url, {})
    return await bed.http.ws_connect(
        bed.gateway_url + "/twilio/media", headers={"X-Twilio-Signature": signature}
    )


async def test_stream_closed_before_start_leaves_nothing_behind(new_tasks: NewTasks) -> None:
    async with test_bed(fast_config()) as bed:
        new_tasks.mark()
        ws = await _signed_stream(bed)
        await ws.send_str(json.dumps({"event": "connected", "protocol": "Call", "version": "1"}))
        await ws.close()
        assert await new_tasks.left() == set()
        assert bed.emulator.record.connections == []


async def test_stream_closed_mid_reply_ends_live_session_and_tasks(new_tasks: NewTasks) -> None:
    async with test_bed(fast_config(reply_s=4.0)) as bed:
        new_tasks.mark()
        call = await bed.caller(speed=SPEED).place_call()
        await call.speak_tone(330.0, 0.5)
        await await_reply(call, 1, min_s=0.0, limit_s=10, step_s=0.05)
        await call.hangup()
        leftover = await new_tasks.left()
        assert leftover == set(), leftover
        connections = bed.emulator.record.connections
        assert connections and all(c.closed_at is not None for c in connections)
        assert bed.metrics.registry.get_sample_value("gateway_calls_active") == 0


async def test_live_failure_ends_the_call_cleanly() -> None:
    config = fast_config()
    async with test_bed(config, reconnect_total_s=1.0) as bed:
        call = await bed.caller(speed=SPEED).place_call()
        await call.speak_tone(330.0, 0.4)
        await wait_reply(call, 1)
        bed.emulator.refuse_connections(until=time.monotonic() + 3600)
        await bed.emulator.cut_all(abrupt=True)
        await call.wait_closed(timeout=10)
        assert call.record.close_code == 1011
        sample = bed.metrics.registry.get_sample_value
        assert sample("gateway_calls_total", {"outcome": "live_failed"}) == 1


def test_audio_segments_helper_sees_caller_tones() -> None:
    """The analysis helper itself: a tone in, a segment out (guards the other tests)."""
    from gateway.testing.twilio_sim import CallRecord, tone_ulaw

    record = CallRecord()
    record.sent_ulaw += tone_ulaw(440.0, 0.5) + bytes([0xFF]) * 4000
    caller, _ = timeline(record)
    found = segments(caller)
    assert len(found) == 1
    assert abs(found[0].freq_hz - 440.0) < 5
    assert abs(found[0].duration_s - 0.5) <= 0.04
