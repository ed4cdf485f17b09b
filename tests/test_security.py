"""Security and hostile input, end to end against the real gateway.

Only Twilio opens calls (signed webhooks, signed upgrade, a single-use stream token bound to
the CallSid); no peer, however broken, hurts another call or the server; no secret reaches
a log line, an error or /metrics. Hostile peers are raw aiohttp clients; the good calls are
the Twilio simulator; the Live side is the emulator, or a stand-in that answers with garbage.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import secrets
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from google import genai
from twilio.request_validator import RequestValidator

from gateway.logs import JsonFormatter, register_secret
from gateway.metrics import Metrics
from gateway.personas import PersonaTable
from gateway.server import STATE, create_app
from gateway.testing import peers
from gateway.testing.analysis import heard_replies
from gateway.testing.harness import (
    AUTH_TOKEN,
    PUBLIC_URL,
    TestBed,
    environment,
    quick_emulator,
    test_bed,
)
from gateway.testing.live_emulator import EmulatorConfig, LiveEmulator
from gateway.testing.peers import ACCOUNT_SID, closed_with, new_sid, say_and_hear, voice_params
from gateway.testing.twilio_sim import TwilioCallerSimulator
from gateway.twilio.webhooks import StreamTokens

if TYPE_CHECKING:
    from conftest import Eventually, LogCapture, NewTasks

SPEED = 2.0
VOICE_URL = PUBLIC_URL + "/twilio/voice"
STATUS_URL = PUBLIC_URL + "/twilio/status"
# Twilio's other callbacks: answering-machine detection, recording status, whisper TwiML.
CALLBACK_URLS = (
    PUBLIC_URL + "/twilio/amd",
    PUBLIC_URL + "/twilio/recording",
    PUBLIC_URL + "/twilio/whisper?summary=Ann+wants+to+move+her+appointment.&language=en-US",
)
STREAM_URL = PUBLIC_URL.replace("https://", "wss://") + "/twilio/media"
SIGNER = RequestValidator(AUTH_TOKEN)


def emulator_config(**overrides: object) -> EmulatorConfig:
    # A key that cannot turn up in a log line by accident.
    api_key = "AIza-test-" + secrets.token_urlsafe(24)
    return quick_emulator(**{"speed": SPEED, "api_key": api_key, **overrides})


def assert_no_secret(texts: list[str], secret_values: list[str]) -> None:
    assert secret_values and all(len(s) >= 8 for s in secret_values)
    leaks = [(s[:6] + "...", t[:200]) for t in texts for s in secret_values if s in t]
    assert leaks == []


# --------------------------------------------------------------- hostile peers


async def post_webhook(
    http: aiohttp.ClientSession,
    bed: TestBed,
    url: str,
    params: dict[str, str],
    headers: dict[str, str],
) -> tuple[int, str]:
    path = url.removeprefix(PUBLIC_URL)
    async with http.post(bed.gateway_url + path, data=params, headers=headers) as resp:
        return resp.status, await resp.text()


async def issue_token(http: aiohttp.ClientSession, bed: TestBed, call_sid: str) -> str:
    """What Twilio gets from a genuine, signed voice webhook: the stream token."""
    params = voice_params(call_sid)
    signature = SIGNER.compute_signature(VOICE_URL, params)
    status, body = await post_webhook(
        http, bed, VOICE_URL, params, {"X-Twilio-Signature": signature}
    )
    assert status == 200, body
    param = ET.fromstring(body).find("./Connect/Stream/Parameter[@name='token']")
    assert param is not None, body
    return param.get("value", "")


async def open_stream(
    http: aiohttp.ClientSession, bed: TestBed, signature: str | None = None
) -> aiohttp.ClientWebSocketResponse:
    """A WebSocket upgrade signed like Twilio's (or with the given signature)."""
    sig = SIGNER.compute_signature(STREAM_URL, {}) if signature is None else signature
    return await http.ws_connect(
        bed.gateway_url + "/twilio/media", headers={"X-Twilio-Signature": sig}
    )


def start_message(
    call_sid: str,
    stream_sid: str,
    token: str | None,
    media_format: tuple[str, int] = ("audio/x-mulaw", 8000),
    persona: str = "default",
    account_sid: str = ACCOUNT_SID,
) -> str:
    """A `start` carrying `token` (and the persona it was issued for), or no parameters."""
    parameters = {} if token is None else {"token": token, "persona": persona}
    return peers.start_message(
        call_sid,
        parameters,
        stream_sid=stream_sid,
        account_sid=account_sid,
        media_format=media_format,
    )


def media_message(
    stream_sid: str, n: int, payload: str | None = None, track: str = "inbound"
) -> str:
    silence = base64.b64encode(b"\xff" * 160).decode()
    return json.dumps(
        {
            "event": "media",
            "sequenceNumber": str(n + 1),
            "streamSid": stream_sid,
            "media": {
                "track": track,
                "chunk": str(n),
                "timestamp": str(20 * n),
                "payload": silence if payload is None else payload,
            },
        }
    )


@contextlib.asynccontextmanager
async def client_session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        yield http


# -------------------------------------------------------------------- webhooks


async def test_webhooks_refuse_unsigned_badly_and_otherwise_signed(logs: LogCapture) -> None:
    async with test_bed(emulator_config()) as bed, client_session() as http:
        params = voice_params(new_sid("CA"))
        other = RequestValidator("another-auth-token-0123456789abcd")
        urls = (VOICE_URL, STATUS_URL, *CALLBACK_URLS)
        for url in urls:
            good = SIGNER.compute_signature(url, params)
            host_url = bed.gateway_url + url.removeprefix(PUBLIC_URL)
            forged = {
                "unsigned": {},
                "empty": {"X-Twilio-Signature": ""},
                "garbage": {"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"},
                "other token": {"X-Twilio-Signature": other.compute_signature(url, params)},
                "other url": {"X-Twilio-Signature": SIGNER.compute_signature(STREAM_URL, params)},
                "request host": {"X-Twilio-Signature": SIGNER.compute_signature(host_url, params)},
                "other params": {
                    "X-Twilio-Signature": SIGNER.compute_signature(
                        url, {**params, "CallSid": new_sid("CA")}
                    )
                },
                "shared key not configured": {
                    "X-Twilio-Signature": good,
                    "X-Twilio-Webhooks-Signature-Settings": "key=KS1,algorithm=HMAC_SHA256",
                },
            }
            for case, headers in forged.items():
                status, body = await post_webhook(http, bed, url, params, headers)
                assert status == 403, (url, case)
                assert "signature" not in body.lower() and "Stream" not in body, (url, case)
            status, _ = await post_webhook(http, bed, url, params, {"X-Twilio-Signature": good})
            assert status in (200, 204), url
        sample = bed.metrics.registry.get_sample_value
        missing = sample("gateway_requests_rejected_total", {"reason": "signature_missing"})
        invalid = sample("gateway_requests_rejected_total", {"reason": "signature_invalid"})
        assert (missing, invalid) == (2 * len(urls), 6 * len(urls))
        warned = logs.messages("gateway.server", "rejected /twilio/")
        assert len(warned) == 8 * len(urls) and all(m.endswith(" signature") for m in warned)
        assert bed.emulator.record.connections == []
        logs.assert_no_traceback_spam()


async def test_a_webhook_signed_for_another_public_url_is_refused_and_says_so(
    logs: LogCapture,
) -> None:
    """The number calls a URL other than PUBLIC_URL (a tunnel's new address): Twilio signed
    that URL, so every call is refused; the log names the URL it was signed for, which only
    a holder of the auth token can sign."""
    async with test_bed(emulator_config()) as bed, client_session() as http:
        params = voice_params(new_sid("CA"))
        tunnel = "https://new-words.trycloudflare.example/twilio/voice"
        headers = {
            "Host": "new-words.trycloudflare.example",
            "X-Twilio-Signature": SIGNER.compute_signature(tunnel, params),
        }
        assert (await post_webhook(http, bed, VOICE_URL, params, headers))[0] == 403
        forged = RequestValidator("another-auth-token-0123456789abcd")
        headers["X-Twilio-Signature"] = forged.compute_signature(tunnel, params)
        assert (await post_webhook(http, bed, VOICE_URL, params, headers))[0] == 403
        assert logs.messages("gateway.server", "rejected /twilio/") == [
            f"rejected /twilio/voice: invalid signature, signed for {tunnel}: set PUBLIC_URL "
            "to the URL the number's webhook calls",
            "rejected /twilio/voice: invalid signature",
        ]
        assert bed.emulator.record.connections == []


# --------------------------------------------------------------- stream upgrade


async def test_unsigned_stream_upgrade_is_refused_before_anything_opens() -> None:
    async with test_bed(emulator_config()) as bed, client_session() as http:
        params = voice_params(new_sid("CA"))
        bad = {
            "unsigned": "",
            "garbage": "bm90IGEgc2lnbmF0dXJl",
            "webhook's signature": SIGNER.compute_signature(VOICE_URL, params),
            "request host": SIGNER.compute_signature(
                bed.gateway_url.replace("http", "ws") + "/twilio/media", {}
            ),
        }
        for case, signature in bad.items():
            headers = {"X-Twilio-Signature": signature} if signature else {}
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(bed.gateway_url + "/twilio/media", headers=headers)
            assert refused.value.status == 403, case
        assert bed.app[STATE].streams.sockets == set()
        assert bed.emulator.record.connections == []


async def test_start_with_parameters_never_issued_is_refused(logs: LogCapture) -> None:
    async with test_bed(emulator_config()) as bed, client_session() as http:
        call_sid = new_sid("CA")
        issued_for_other = await issue_token(http, bed, new_sid("CA"))
        forged = StreamTokens(os.urandom(32)).issue(call_sid)
        genuine = await issue_token(http, bed, call_sid)
        tampered = genuine[:-2] + ("AA" if not genuine.endswith("AA") else "BB")
        cases = {
            "malformed": None,
            "malformed ": "not-a-token",
            "bad_signature": forged,
            "bad_signature ": tampered,
            "wrong_call": issued_for_other,
        }
        for verdict, token in cases.items():
            ws = await open_stream(http, bed)
            await ws.send_str(start_message(call_sid, new_sid("MZ"), token))
            assert await closed_with(ws) == (1008, f"stream token {verdict.strip()}"), verdict
        # The call's genuine token still opens its stream after all those attempts.
        ws = await open_stream(http, bed)
        await ws.send_str(start_message(call_sid, new_sid("MZ"), genuine))
        await asyncio.sleep(0.2)
        assert not ws.closed
        await ws.close()
        await asyncio.sleep(0.1)
        connections = len(bed.emulator.record.connections)
        assert connections <= 1  # only the genuine stream may have reached Live
        refusals = logs.messages("gateway.server", "stream closed: stream token")
        assert len(refusals) == len(cases)
        logs.assert_no_traceback_spam()

    async with test_bed(emulator_config(), stream_token_ttl_s=0.2) as bed, client_session() as http:
        call_sid = new_sid("CA")
        token = await issue_token(http, bed, call_sid)
        await asyncio.sleep(0.4)
        ws = await open_stream(http, bed)
        await ws.send_str(start_message(call_sid, new_sid("MZ"), token))
        assert await closed_with(ws) == (1008, "stream token expired")
        assert bed.emulator.record.connections == []


async def test_genuine_stream_accepted_and_the_same_parameters_refused_after() -> None:
    async with test_bed(emulator_config()) as bed, client_session() as http:
        caller = TwilioCallerSimulator(http, bed.gateway_url, PUBLIC_URL, AUTH_TOKEN, speed=SPEED)
        call = await caller.place_call()
        await say_and_hear(call, 1)
        token = call.record.custom_parameters["token"]
        replay = start_message(
            call.record.call_sid,
            call.record.stream_sid,
            token,
            persona=call.record.custom_parameters["persona"],
            account_sid=call.record.account_sid,
        )
        # While the genuine call runs, and after it ended: the replay is refused.
        ws = await open_stream(http, bed)
        await ws.send_str(replay)
        assert await closed_with(ws) == (1008, "stream token reused")
        await call.hangup()
        ws = await open_stream(http, bed)
        await ws.send_str(replay)
        assert await closed_with(ws) == (1008, "stream token reused")
        assert [r.n for r in heard_replies(call.record)] == [1]
        assert len(bed.emulator.record.connections) == 1
        reused = {"reason": "stream_token_reused"}
        assert bed.metrics.registry.get_sample_value("gateway_stream_errors_total", reused) == 2


# ------------------------------------------------------------- hostile crowd


Hostile = Callable[[aiohttp.ClientSession, TestBed, list[str]], Awaitable[tuple[int | None, str]]]


async def _send_then_close_code(
    http: aiohttp.ClientSession, bed: TestBed, frames: Sequence[str | bytes]
) -> tuple[int | None, str]:
    ws = await open_stream(http, bed)
    try:
        for frame in frames:
            with contextlib.suppress(ConnectionError, aiohttp.ClientError):
                if isinstance(frame, bytes):
                    await ws.send_bytes(frame)
                else:
                    await ws.send_str(frame)
        return await closed_with(ws)
    finally:
        await ws.close()


async def _started(
    http: aiohttp.ClientSession, bed: TestBed, tokens: list[str], then: list[str]
) -> tuple[int | None, str]:
    """A genuine start (Twilio gone bad), a few good frames, then `then`."""
    call_sid, stream_sid = new_sid("CA"), new_sid("MZ")
    token = await issue_token(http, bed, call_sid)
    tokens.append(token)
    good = [media_message(stream_sid, n) for n in range(5)]
    frames = [start_message(call_sid, stream_sid, token), *good]
    return await _send_then_close_code(
        http, bed, frames + [f.replace("{stream_sid}", stream_sid) for f in then]
    )


def _frames(*frames: str | bytes) -> Hostile:
    async def run(
        http: aiohttp.ClientSession, bed: TestBed, tokens: list[str]
    ) -> tuple[int | None, str]:
        return await _send_then_close_code(http, bed, list(frames))

    return run


def _after_start(*frames: str) -> Hostile:
    async def run(
        http: aiohttp.ClientSession, bed: TestBed, tokens: list[str]
    ) -> tuple[int | None, str]:
        return await _started(http, bed, tokens, list(frames))

    return run


_MZ = "MZ" + "1" * 32
HOSTILE: dict[str, tuple[Hostile, int, str]] = {
    "garbage text": (_frames("hello, this is not JSON {"), 1008, "invalid JSON"),
    "random binary": (_frames(os.urandom(300)), 1003, "binary frames not supported"),
    "3 MB message": (_frames("x" * 3_000_000), 1009, "message too big"),
    "media before start": (_frames(media_message(_MZ, 0)), 1008, "media before start"),
    "stop without start": (
        _frames(json.dumps({"event": "stop", "streamSid": _MZ, "stop": {}})),
        1008,
        "stop before start",
    ),
    "unknown event": (_frames(json.dumps({"event": "hijack"})), 1008, "unknown event"),
    "wrong media format": (
        _frames(start_message(new_sid("CA"), _MZ, "x", ("audio/l16", 16000))),
        1003,
        "unsupported media format",
    ),
    "valid start, then garbage": (_after_start("}{ garbage"), 1008, "invalid JSON"),
    "valid start, then bad base64": (
        _after_start(media_message("{stream_sid}", 9, payload="!!not base64!!")),
        1008,
        "invalid base64 payload",
    ),
    "valid start, then wrong track": (
        _after_start(media_message("{stream_sid}", 9, track="outbound")),
        1008,
        "unsupported media track",
    ),
}


async def test_good_call_unharmed_beside_thirty_hostile_streams(
    logs: LogCapture, new_tasks: NewTasks
) -> None:
    async with test_bed(emulator_config()) as bed:
        new_tasks.mark()
        tokens: list[str] = []
        async with client_session() as http:
            caller = TwilioCallerSimulator(
                http, bed.gateway_url, PUBLIC_URL, AUTH_TOKEN, speed=SPEED
            )
            call = await caller.place_call()
            kinds = [kind for kind in HOSTILE for _ in range(3)]
            assert len(kinds) == 30
            crowd = asyncio.gather(*(HOSTILE[kind][0](http, bed, tokens) for kind in kinds))
            await say_and_hear(call, 1)
            results = await crowd
            async with http.get(bed.gateway_url + "/healthz") as resp:
                assert resp.status == 200
            async with http.get(bed.gateway_url + "/readyz") as resp:
                assert resp.status == 200
            await say_and_hear(call, 2, freq=380.0)
            await call.hangup()
            tokens.append(call.record.custom_parameters["token"])
            async with http.get(bed.gateway_url + "/metrics") as resp:
                metrics_text = await resp.text()
        leftover = await new_tasks.left()

        # The good call: both replies heard, in order, nothing odd on its stream.
        assert [r.n for r in heard_replies(call.record) if r.duration_s > 0.7] == [1, 2]
        assert call.record.protocol_errors == []
        assert call.record.closed_by == "caller"
        # Every hostile stream closed with its fitting code and reason.
        for kind, (code, reason) in zip(kinds, results, strict=True):
            expected_code, expected_reason = HOSTILE[kind][1:]
            assert code == expected_code, (kind, code, reason)
            assert reason in (expected_reason, ""), (kind, reason)  # 1009: aiohttp closes
        # Logged once per stream, counted, no traceback; nothing left behind.
        logged = Counter(
            m.removeprefix("stream closed: ")
            for m in logs.messages("gateway.server", "stream closed: ")
        )
        assert logged == Counter(HOSTILE[kind][2] for kind in kinds)
        counted = sum(
            s.value
            for metric in bed.metrics.admission.stream_errors.collect()
            for s in metric.samples
            if s.name.endswith("_total")
        )
        assert counted == 30
        logs.assert_no_traceback_spam()
        assert leftover == set(), leftover
        state = bed.app[STATE]
        assert state.streams.sockets == set() and state.calls == set()
        assert all(c.closed_at is not None for c in bed.emulator.record.connections)
        assert bed.metrics.registry.get_sample_value("gateway_calls_active") == 0
        # No secret anywhere: logs, metrics, close reasons.
        assert len(tokens) == 10
        secret_values = [AUTH_TOKEN, bed.emulator.config.api_key, *tokens]
        reasons = [reason for _, reason in results]
        assert_no_secret([*logs.texts(), metrics_text, *reasons], secret_values)


# -------------------------------------------------------------------- limits


async def test_call_limit_answers_busy_and_readiness_says_so(eventually: Eventually) -> None:
    async with test_bed(emulator_config(), max_calls=1) as bed, client_session() as http:
        caller = TwilioCallerSimulator(http, bed.gateway_url, PUBLIC_URL, AUTH_TOKEN, speed=SPEED)
        call = await caller.place_call()
        params = voice_params(new_sid("CA"))
        signature = SIGNER.compute_signature(VOICE_URL, params)
        status, twiml = await post_webhook(
            http, bed, VOICE_URL, params, {"X-Twilio-Signature": signature}
        )
        root = ET.fromstring(twiml)
        assert status == 200 and root.tag == "Response"
        reject = root.find("Reject")
        assert reject is not None and reject.get("reason") == "busy"
        assert root.find("Connect") is None and "token" not in twiml
        async with http.get(bed.gateway_url + "/readyz") as resp:
            assert resp.status == 503 and "limit" in await resp.text()
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await open_stream(http, bed)
        assert refused.value.status == 503
        busy = {"reason": "busy"}
        assert bed.metrics.registry.get_sample_value("gateway_requests_rejected_total", busy) == 1

        await call.hangup()
        await eventually(lambda: not bed.app[STATE].streams.sockets, limit_s=5)
        async with http.get(bed.gateway_url + "/readyz") as resp:
            assert resp.status == 200
        assert await issue_token(http, bed, new_sid("CA"))


async def test_start_deadline_and_idle_stream_are_closed(
    logs: LogCapture, eventually: Eventually
) -> None:
    async with (
        test_bed(emulator_config(), start_timeout_s=0.4, idle_timeout_s=1.0) as bed,
        client_session() as http,
    ):
        # Silent after the upgrade; and one that pings (keeps the socket alive) but never
        # starts: both closed at the start deadline, before any Live session.
        silent = await open_stream(http, bed)
        pinging = await open_stream(http, bed)
        await pinging.send_str(
            json.dumps({"event": "connected", "protocol": "Call", "version": "1"})
        )

        async def keep_pinging() -> None:
            while not pinging.closed:
                with contextlib.suppress(ConnectionError, aiohttp.ClientError, RuntimeError):
                    await pinging.ping()
                await asyncio.sleep(0.1)

        pinger = asyncio.create_task(keep_pinging())
        started = time.monotonic()
        results = await asyncio.gather(closed_with(silent), closed_with(pinging))
        waited = time.monotonic() - started
        await pinger
        assert list(results) == [(1008, "no start before the deadline")] * 2
        assert waited >= 0.3
        assert bed.emulator.record.connections == []

        # A started call whose stream goes quiet: closed, and its Live session with it.
        caller = TwilioCallerSimulator(http, bed.gateway_url, PUBLIC_URL, AUTH_TOKEN, speed=SPEED)
        call = await caller.place_call()
        await call.wait_closed(timeout=10)
        assert (call.record.close_code, call.record.close_reason) == (1008, "stream idle too long")
        await call.hangup()
        connections = bed.emulator.record.connections
        await eventually(lambda: all(c.closed_at is not None for c in connections), limit_s=5)
        closed = Counter(logs.messages("gateway.server", "stream closed: "))
        assert closed == {
            "stream closed: no start before the deadline": 2,
            "stream closed: stream idle too long": 1,
        }
        logs.assert_no_traceback_spam()


# ---------------------------------------------------------------- Live side


@dataclass(frozen=True)
class Garbage:
    name: str
    frame: str | bytes
    before_setup: bool = False  # instead of setupComplete


LIVE_GARBAGE = (
    Garbage("not JSON", "<html><body>502 Bad Gateway</body></html>"),
    Garbage("binary not JSON", b"\x00\xffnot json\x80"),
    Garbage("unknown message", json.dumps({"somethingNew": {"x": 1}})),
    Garbage("JSON array", "[1, 2, 3]"),
    Garbage(
        "bad field",
        json.dumps({"serverContent": {"modelTurn": {"parts": [{"inlineData": {"data": "!"}}]}}}),
    ),
    Garbage("garbage for setup", "not a setupComplete", before_setup=True),
)


class RogueLive:
    """Stands in for the Live service: relays to the emulator, or, once `garbage` is set,
    accepts the setup and then answers with junk (one kind per connection, in turn)."""

    def __init__(self, emulator: LiveEmulator) -> None:
        self.emulator = emulator
        self.garbage = False
        self.served: list[str] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        assert self.emulator.tls is not None
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.emulator.tls.server_ssl)
        await site.start()
        self.url = f"https://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return await self._forward(request)  # the models API, as the emulator answers
        ws = web.WebSocketResponse(max_msg_size=16 * 1024 * 1024)
        await ws.prepare(request)
        if self.garbage:
            await self._junk(ws)
        else:
            await self._relay(request, ws)
        return ws

    async def _forward(self, request: web.Request) -> web.Response:
        assert self.emulator.tls is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() == "x-goog-api-key"}
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                self.emulator.base_url + request.path_qs,
                headers=headers,
                ssl=self.emulator.tls.client_ssl,
            ) as answer,
        ):
            body = await answer.read()
            return web.Response(status=answer.status, body=body, content_type="application/json")

    async def _junk(self, ws: web.WebSocketResponse) -> None:
        garbage = LIVE_GARBAGE[len(self.served) % len(LIVE_GARBAGE)]
        self.served.append(garbage.name)
        await ws.receive()  # the setup
        if not garbage.before_setup:
            await ws.send_str(json.dumps({"setupComplete": {}}))
        if isinstance(garbage.frame, bytes):
            await ws.send_bytes(garbage.frame)
        else:
            await ws.send_str(garbage.frame)
        async for _ in ws:
            pass

    async def _relay(self, request: web.Request, ws: web.WebSocketResponse) -> None:
        assert self.emulator.tls is not None
        upstream_url = self.emulator.base_url.replace("https://", "wss://") + request.path_qs
        headers = {k: v for k, v in request.headers.items() if k.lower() == "x-goog-api-key"}
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(
                upstream_url, headers=headers, ssl=self.emulator.tls.client_ssl, max_msg_size=0
            ) as upstream,
        ):

            async def pipe(
                src: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                dst: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
            ) -> None:
                async for msg in src:
                    if msg.type is WSMsgType.TEXT:
                        await dst.send_str(msg.data)
                    elif msg.type is WSMsgType.BINARY:
                        await dst.send_bytes(msg.data)
                await dst.close()

            tasks = [
                asyncio.create_task(pipe(ws, upstream)),
                asyncio.create_task(pipe(upstream, ws)),
            ]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def test_garbage_from_live_ends_that_call_only(logs: LogCapture) -> None:
    async with test_bed(emulator_config(), reconnect_total_s=1.5) as bed:
        rogue = RogueLive(bed.emulator)
        await rogue.start()
        assert bed.emulator.tls is not None
        with environment(
            GOOGLE_GEMINI_BASE_URL=rogue.url, SSL_CERT_FILE=bed.emulator.tls.ca_pem_path
        ):
            client = genai.Client(api_key=bed.emulator.config.api_key)
        personas = PersonaTable.from_settings(bed.settings)
        app = create_app(bed.settings, personas, client=client, metrics=Metrics())
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        gateway_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with client_session() as http:
                caller = TwilioCallerSimulator(
                    http, gateway_url, PUBLIC_URL, AUTH_TOKEN, speed=SPEED
                )
                good = await caller.place_call()
                await say_and_hear(good, 1)
                rogue.garbage = True
                bad = await caller.place_call()
                await asyncio.gather(say_and_hear(good, 2, freq=380.0), bad.wait_closed(timeout=15))
                await good.hangup()
                await bad.hangup()
        finally:
            await runner.cleanup()
            await rogue.stop()

        # The bad call ends with 1011 within the reconnect bounds; no hot reconnect loop.
        assert (bad.record.close_code, bad.record.close_reason) == (1011, "live session failed")
        assert 2 <= len(rogue.served) <= bed.settings.live.reconnect_max_attempts, rogue.served
        failed = logs.messages("gateway.call", "call ended: live session failed: ")
        assert len(failed) == 1 and "last error" in failed[0], failed
        lost = " ".join(logs.messages("gateway.live.session", "live: connection lost"))
        assert "ValueError" in lost  # the SDK's error for a message that is not JSON
        # The other call heard both replies and was never disturbed.
        assert [r.n for r in heard_replies(good.record) if r.duration_s > 0.7] == [1, 2]
        assert good.record.protocol_errors == [] and good.record.closed_by == "caller"
        logs.assert_no_traceback_spam()
        assert_no_secret(logs.texts(), [AUTH_TOKEN, bed.emulator.config.api_key])


# ---------------------------------------------------------------- log backstop


async def test_formatters_redact_secrets_a_library_logs() -> None:
    """websockets logs request headers at DEBUG, the API key among them; production keeps it
    at WARNING, and should anyone turn it up, the formatter still prints no key."""
    async with test_bed(emulator_config()) as bed, client_session() as http:
        out = io.StringIO()
        handler = logging.StreamHandler(out)
        handler.setFormatter(JsonFormatter())
        ws_logger = logging.getLogger("websockets")
        saved = ws_logger.level
        ws_logger.setLevel(logging.DEBUG)
        ws_logger.addHandler(handler)
        try:
            caller = TwilioCallerSimulator(
                http, bed.gateway_url, PUBLIC_URL, AUTH_TOKEN, speed=SPEED
            )
            call = await caller.place_call()
            await call.silence(0.3)
            await call.hangup()
        finally:
            ws_logger.removeHandler(handler)
            ws_logger.setLevel(saved)
        text = out.getvalue()
        assert "x-goog-api-key: [redacted]" in text
        assert bed.emulator.config.api_key not in text
        # The settings print their secrets masked, should anything log them.
        for shown in (repr(bed.settings), str(bed.settings), repr(bed.app[STATE])):
            assert AUTH_TOKEN not in shown and bed.emulator.config.api_key not in shown

    register_secret("sk-test-0123456789")
    token = StreamTokens(os.urandom(32)).issue(new_sid("CA"))
    record = logging.makeLogRecord(
        {"msg": "token=%s key=%s", "args": (token, "sk-test-0123456789"), "levelname": "INFO"}
    )
    line = JsonFormatter().format(record)
    assert token not in line and "sk-test-0123456789" not in line
    assert json.loads(line)["msg"] == "token=[redacted] key=[redacted]"


# ------------------------------------------------------------------ fingerprint


async def test_no_response_names_the_server_software() -> None:
    """No `Server: Python/3.x aiohttp/3.x` (aiohttp's default) on any response: answers,
    errors raised by handlers and by the router, refusals and a WebSocket upgrade."""
    async with test_bed(emulator_config()) as bed, client_session() as http:
        upgrade = {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
            "Sec-WebSocket-Version": "13",
        }
        signed = {"X-Twilio-Signature": SIGNER.compute_signature(STREAM_URL, {})}
        form = voice_params(new_sid("CA"))
        requests: list[tuple[str, str, dict[str, str], dict[str, str] | None, int]] = [
            ("GET", "/healthz", {}, None, 200),
            ("GET", "/metrics", {}, None, 200),
            ("GET", "/no-such-path", {}, None, 404),
            ("GET", "/twilio/voice", {}, None, 405),
            ("POST", "/twilio/voice", {}, None, 400),  # not a form
            ("POST", "/twilio/voice", {}, form, 403),  # unsigned
            ("GET", "/twilio/media", upgrade, None, 403),
            ("GET", "/twilio/media", upgrade | signed, None, 101),
        ]
        for method, path, headers, data, status in requests:
            url = bed.gateway_url + path
            async with http.request(method, url, headers=headers, data=data) as resp:
                assert resp.status == status, (method, path)
                assert "Server" not in resp.headers, (method, path, resp.headers["Server"])
                if status == 101:
                    assert resp.headers["Upgrade"].lower() == "websocket"
        bed.app[STATE].draining = True
        async with http.get(bed.gateway_url + "/readyz") as resp:
            assert resp.status == 503 and "Server" not in resp.headers
