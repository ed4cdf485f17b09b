"""Hand-made Twilio peers, for tests of what the gateway does with bad or replayed input.

The simulator (`twilio_sim`) only ever behaves; a hostile test builds its requests and
stream messages itself, with these.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Mapping

import aiohttp
from aiohttp import WSMsgType

from gateway.testing.analysis import await_reply
from gateway.testing.twilio_sim import SimulatedCall

ACCOUNT_SID = "AC" + "0" * 32


def new_sid(prefix: str) -> str:
    """A fresh Twilio-shaped SID (`CA…`, `MZ…`): 2 letters and 32 hex digits."""
    return prefix + secrets.token_hex(16)


def voice_params(call_sid: str, account_sid: str = ACCOUNT_SID) -> dict[str, str]:
    """The form of Twilio's voice webhook for a ringing inbound call."""
    return {
        "AccountSid": account_sid,
        "CallSid": call_sid,
        "CallStatus": "ringing",
        "From": "+15005550006",
        "To": "+15005550001",
    }


def start_message(
    call_sid: str,
    parameters: Mapping[str, str],
    *,
    stream_sid: str | None = None,
    account_sid: str = ACCOUNT_SID,
    media_format: tuple[str, int] = ("audio/x-mulaw", 8000),
) -> str:
    """A media stream's `start`, carrying `parameters` (the TwiML's `<Parameter>`s); a new
    StreamSid unless one is given."""
    stream_sid = stream_sid or new_sid("MZ")
    return json.dumps(
        {
            "event": "start",
            "sequenceNumber": "1",
            "streamSid": stream_sid,
            "start": {
                "accountSid": account_sid,
                "streamSid": stream_sid,
                "callSid": call_sid,
                "tracks": ["inbound"],
                "customParameters": dict(parameters),
                "mediaFormat": {
                    "encoding": media_format[0],
                    "sampleRate": media_format[1],
                    "channels": 1,
                },
            },
        }
    )


async def closed_with(ws: aiohttp.ClientWebSocketResponse) -> tuple[int | None, str]:
    """Read until the gateway closes: (close code, close reason)."""
    async with asyncio.timeout(15):
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.CLOSE:
                return ws.close_code, msg.extra or ""
            if msg.type in (WSMsgType.CLOSED, WSMsgType.CLOSING, WSMsgType.ERROR):
                return ws.close_code, ""


async def say_and_hear(call: SimulatedCall, n: int, freq: float = 340.0) -> None:
    """Say something and keep the line open (as Twilio does) until reply n was heard."""
    await call.speak_tone(freq, 0.6)
    await await_reply(call, n, min_s=0.7, limit_s=15)
