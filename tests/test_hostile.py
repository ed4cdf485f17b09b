"""Hostile networks and bad peers, on real loopback sockets against the real gateway.

Bad bytes are client errors (4xx and one warning, never a 500 or a traceback); a CallSid gets
one stream for the life of the call whatever is replayed; and beside every bad peer a good
call, placed by the Twilio simulator against the Live emulator, still completes.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

import aiohttp
import pytest
from twilio.request_validator import RequestValidator

from gateway.testing.analysis import heard_replies
from gateway.testing.harness import AUTH_TOKEN, PUBLIC_URL, TestBed, quick_emulator, test_bed
from gateway.testing.peers import (
    ACCOUNT_SID,
    closed_with,
    new_sid,
    say_and_hear,
    start_message,
    voice_params,
)
from gateway.testing.twilio_sim import CallRejected, SimulatedCall, TwilioCallerSimulator

if TYPE_CHECKING:
    from conftest import LogCapture

SPEED = 2.0
VOICE_URL = PUBLIC_URL + "/twilio/voice"
STREAM_URL = PUBLIC_URL.replace("https://", "wss://") + "/twilio/media"
SIGNER = RequestValidator(AUTH_TOKEN)


async def post_voice(bed: TestBed, params: dict[str, str]) -> tuple[int, str]:
    """A voice webhook signed as Twilio signs it."""
    signature = SIGNER.compute_signature(VOICE_URL, params)
    async with bed.http.post(
        bed.gateway_url + "/twilio/voice", data=params, headers={"X-Twilio-Signature": signature}
    ) as resp:
        return resp.status, await resp.text()


def stream_parameters(twiml: str) -> dict[str, str]:
    """The `<Parameter>`s of the TwiML's stream; empty for any other answer."""
    stream = ET.fromstring(twiml).find("./Connect/Stream")
    if stream is None:
        return {}
    return {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}


async def open_stream(bed: TestBed) -> aiohttp.ClientWebSocketResponse:
    """A WebSocket upgrade signed as Twilio signs it (the same for every call)."""
    signature = SIGNER.compute_signature(STREAM_URL, {})
    return await bed.http.ws_connect(
        bed.gateway_url + "/twilio/media", headers={"X-Twilio-Signature": signature}
    )


def assert_completed(call: SimulatedCall, replies: int) -> None:
    assert [r.n for r in heard_replies(call.record) if r.duration_s > 0.7] == list(
        range(1, replies + 1)
    )
    assert call.record.protocol_errors == []
    assert call.record.closed_by == "caller"


# ------------------------------------------------------------------- bad bytes


BAD_BODIES = {
    "invalid UTF-8": (b"CallSid=CA\xff\xfe&AccountSid=AC1", None, "invalid UTF-8"),
    "escaped invalid UTF-8": (b"CallSid=CA%ff%fe", None, "invalid UTF-8"),
    "not a form": (b"CallSid", None, "malformed form"),
    "JSON": (b'{"CallSid": "CA1"}', "application/json", "not a form"),
    "multipart": (b"--b\r\n\r\n--b--\r\n", "multipart/form-data; boundary=b", "not a form"),
    "latin-1": (b"CallSid=CA\xe9", "application/x-www-form-urlencoded; charset=latin-1", None),
}


async def test_undecodable_webhook_bodies_are_client_errors(logs: LogCapture) -> None:
    async with test_bed(quick_emulator(SPEED)) as bed:
        call = await bed.caller(speed=SPEED).place_call()
        for path in ("/twilio/voice", "/twilio/status"):
            for case, (body, content_type, _) in BAD_BODIES.items():
                headers = {
                    "Content-Type": content_type or "application/x-www-form-urlencoded",
                    "X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl",
                }
                url = bed.gateway_url + path
                async with bed.http.post(url, data=body, headers=headers) as resp:
                    assert resp.status == 400, (path, case, resp.status)
                    assert "Stream" not in await resp.text()
        await say_and_hear(call, 1)
        await call.hangup()

        assert_completed(call, 1)
        bad_form = {"reason": "bad_form"}
        rejected = bed.metrics.registry.get_sample_value(
            "gateway_requests_rejected_total", bad_form
        )
        assert rejected == 2 * len(BAD_BODIES)
        warned = logs.warnings("rejected /twilio/")
        expected = [reason or "charset not UTF-8" for _, _, reason in BAD_BODIES.values()]
        assert warned == [f"rejected /twilio/voice: {r}" for r in expected] + [
            f"rejected /twilio/status: {r}" for r in expected
        ]
        logs.assert_quiet()


# ------------------------------------------------------------ one call, one stream


async def test_replayed_webhooks_open_no_second_stream(logs: LogCapture) -> None:
    async with test_bed(quick_emulator(SPEED)) as bed:
        caller = bed.caller(speed=SPEED)
        good = await caller.place_call()
        await say_and_hear(good, 1)
        # Replaying the genuine call's signed webhook, during the call and after it: busy,
        # and no token to open a stream with.
        params = voice_params(good.record.call_sid, good.record.account_sid)
        during = [await post_voice(bed, params) for _ in range(5)]
        await say_and_hear(good, 2, freq=380.0)
        await good.hangup()
        after = [await post_voice(bed, params) for _ in range(3)]
        for status, twiml in during + after:
            assert status == 200 and stream_parameters(twiml) == {}
            assert ET.fromstring(twiml).find("Reject") is not None
        with pytest.raises(CallRejected):
            await caller.place_call(call_sid=good.record.call_sid)

        # A call whose webhook Twilio retried before its stream started: two tokens, one
        # stream. The other token is refused while the stream runs and after it ended.
        call_sid = new_sid("CA")
        first = stream_parameters((await post_voice(bed, voice_params(call_sid)))[1])
        second = stream_parameters((await post_voice(bed, voice_params(call_sid)))[1])
        assert first["token"] != second["token"]
        opened = await open_stream(bed)
        await opened.send_str(start_message(call_sid, first))
        refused = await open_stream(bed)
        await refused.send_str(start_message(call_sid, second))
        assert await closed_with(refused) == (1008, "stream token second_stream")
        await opened.close()
        for parameters in (second, first):
            again = await open_stream(bed)
            await again.send_str(start_message(call_sid, parameters))
            assert (await closed_with(again))[0] == 1008

        assert_completed(good, 2)
        replayed = {"reason": "replayed"}
        assert (
            bed.metrics.registry.get_sample_value("gateway_requests_rejected_total", replayed)
            == 8 + 1
        )
        # Only the two genuine streams ever reached the Live side.
        assert len(bed.emulator.record.connections) == 2
        logs.assert_quiet()


async def test_token_binds_the_account_and_the_persona(logs: LogCapture) -> None:
    async with test_bed(quick_emulator(SPEED), twilio_account_sid=ACCOUNT_SID) as bed:
        caller = TwilioCallerSimulator(
            bed.http, bed.gateway_url, PUBLIC_URL, AUTH_TOKEN, speed=SPEED, account_sid=ACCOUNT_SID
        )
        good = await caller.place_call()
        # A webhook from another account is refused, though signed with the same token.
        other = "AC" + "f" * 32
        status, _ = await post_voice(bed, voice_params(new_sid("CA"), other))
        assert status == 403
        # A genuine token with the `start` naming another account or persona: refused, and
        # the token still opens the stream it was issued for.
        call_sid = new_sid("CA")
        parameters = stream_parameters((await post_voice(bed, voice_params(call_sid)))[1])
        cases = {
            "wrong_account": start_message(call_sid, parameters, account_sid=other),
            "wrong_persona": start_message(call_sid, {**parameters, "persona": "sales"}),
        }
        for verdict, start in cases.items():
            ws = await open_stream(bed)
            await ws.send_str(start)
            assert await closed_with(ws) == (1008, f"stream token {verdict}")
        ws = await open_stream(bed)
        await ws.send_str(start_message(call_sid, parameters))
        await say_and_hear(good, 1)
        assert not ws.closed
        await ws.close()
        await good.hangup()

        assert_completed(good, 1)
        wrong = {"reason": "wrong_account"}
        assert bed.metrics.registry.get_sample_value("gateway_requests_rejected_total", wrong) == 1
        logs.assert_quiet()
