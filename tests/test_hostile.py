"""Hostile networks and bad peers, on real loopback sockets against the real gateway.

Bad bytes are client errors (4xx and one warning, never a 500 or a traceback); a CallSid gets
one stream for the life of the call whatever is replayed; and beside every bad peer a good
call, placed by the Twilio simulator against the Live emulator, still completes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import resource
import socket
import sys
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp
import pytest
from google import genai
from twilio.request_validator import RequestValidator

from gateway.admission import START_GRACE_S
from gateway.listener import open_file_limit, raise_open_file_limit
from gateway.metrics import Metrics
from gateway.personas import PersonaTable
from gateway.server import CONNECTION_LOG_BURST, STATE, create_app, start_server
from gateway.testing.analysis import heard_replies
from gateway.testing.harness import (
    AUTH_TOKEN,
    PUBLIC_URL,
    TestBed,
    environment,
    quick_emulator,
    test_bed,
)
from gateway.testing.peers import (
    ACCOUNT_SID,
    closed_with,
    new_sid,
    say_and_hear,
    start_message,
    voice_params,
)
from gateway.testing.twilio_sim import (
    CallRejected,
    SimulatedCall,
    TwilioCallerSimulator,
    tone_ulaw,
)

if TYPE_CHECKING:
    from conftest import Eventually, LogCapture

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


def replies_heard(call: SimulatedCall, min_s: float = 0.7) -> list[int]:
    """The replies the caller heard at least `min_s` of, in the order first heard.

    A reply's pieces are added up: on a loaded machine the caller's playback can stall
    between two pieces of a reply and hear it as two stretches.
    """
    total: dict[int, float] = {}
    for reply in heard_replies(call.record):
        total[reply.n] = total.get(reply.n, 0.0) + reply.duration_s
    return [n for n, heard_s in total.items() if heard_s >= min_s]


def assert_completed(call: SimulatedCall, replies: int) -> None:
    assert replies_heard(call) == list(range(1, replies + 1)), heard_replies(call.record)
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


MALFORMED_HTTP = {
    "not HTTP": b"HELLO THERE\r\n\r\n",
    "bad request line": b"GET /healthz HTTP/9.Q\r\n\r\n",
    "header too long": b"GET /healthz HTTP/1.1\r\nX-Pad: " + b"a" * 10000 + b"\r\n\r\n",
    "bad header": b"GET /healthz HTTP/1.1\r\nHost gateway\r\n\r\n",
    "bad chunk": b"POST /twilio/voice HTTP/1.1\r\nHost: gateway\r\n"
    b"Content-Type: application/x-www-form-urlencoded\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\nCallSid\r\n",
}


async def test_malformed_http_gets_400_and_is_logged_once_per_interval(logs: LogCapture) -> None:
    async with test_bed(quick_emulator(SPEED)) as bed:
        good = await bed.caller(speed=SPEED).place_call()
        kinds = [kind for kind in MALFORMED_HTTP for _ in range(10)]
        answers = []
        for kind in kinds:
            reader, writer = await raw_connect(bed)
            writer.write(MALFORMED_HTTP[kind])
            answers.append(await until_closed(reader))
            writer.close()
        await say_and_hear(good, 1)
        await good.hangup()

        for kind, answer in zip(kinds, answers, strict=True):
            assert answer.split(b" ", 2)[1] == b"400", (kind, answer[:60])
        assert_completed(good, 1)
        counted = sum(
            s.value
            for family in bed.metrics.registry.collect()
            if family.name in ("gateway_peer_errors", "gateway_requests_rejected")
            for s in family.samples
            if s.name.endswith("_total")
        )
        assert counted == len(kinds)
        logs.assert_quiet()
        # A handful of lines as they came, the rest counted for the summary.
        assert len(logs.warnings("bad request from a peer: ")) <= CONNECTION_LOG_BURST


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


# ---------------------------------------------------------------- raw sockets


def gateway_port(bed: TestBed) -> int:
    return int(bed.gateway_url.rsplit(":", 1)[1])


async def raw_connect(
    bed: TestBed, receive_buffer: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain TCP connection to the gateway; with `receive_buffer`, one that holds little
    of what it does not read (the kernel's buffer and the reader's are both that small)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gateway_port(bed)))
    return await asyncio.open_connection(sock=sock, limit=receive_buffer or 2**16)


async def until_closed(reader: asyncio.StreamReader, limit_s: float = 15.0) -> bytes:
    """Everything the gateway sends until it closes the connection."""
    data = b""
    async with asyncio.timeout(limit_s):
        while True:
            try:
                chunk = await reader.read(4096)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk


def summed_up(logs: LogCapture, what: str, reason: str) -> int:
    """What a throttle's summary lines ("<what>: N more ... (<reason> N, ...)") counted."""
    total = 0
    for line in logs.warnings(f"{what}: "):
        match = re.search(rf"\b{re.escape(reason)} (\d+)", line)
        total += int(match.group(1)) if match else 0
    return total


def sample(bed: TestBed, name: str, **labels: str) -> float:
    return bed.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_idle_and_half_sent_connections_are_closed_at_their_deadlines(
    logs: LogCapture, eventually: Eventually
) -> None:
    async with test_bed(
        quick_emulator(SPEED),
        http_header_timeout_s=0.5,
        http_keepalive_s=2.0,
        http_body_timeout_s=0.5,
        peer_log_interval_s=0.5,
    ) as bed:
        good = await bed.caller(speed=SPEED).place_call()
        head = b"POST /twilio/voice HTTP/1.1\r\nHost: gateway\r\n"
        form = b"Content-Type: application/x-www-form-urlencoded\r\n"
        sends = {
            "idle": b"",
            "half a head": head + b"Content-Le",
            "half a body": head + form + b"Content-Length: 1000\r\n\r\nCallSid=CA",
            "kept alive": b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n",
        }
        peers: list[tuple[str, asyncio.StreamReader, asyncio.StreamWriter]] = []
        for kind, data in sends.items():
            for _ in range(20):
                reader, writer = await raw_connect(bed)
                writer.write(data)
                peers.append((kind, reader, writer))
        closes = asyncio.gather(*(until_closed(reader) for _, reader, _ in peers))
        await say_and_hear(good, 1)
        answers = await closes
        for writer in (w for _, _, w in peers):
            writer.close()
        await say_and_hear(good, 2, freq=380.0)
        await good.hangup()

        # Every one was closed by the gateway: with nothing said, a 408 for the body that
        # never came, the answer for the kept-alive one.
        for (kind, _, _), answer in zip(peers, answers, strict=True):
            if kind in ("idle", "half a head"):
                assert answer == b"", kind
            elif kind == "half a body":
                assert answer.startswith(b"HTTP/1.1 408 "), answer[:40]
            else:
                assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"ok\n")
        assert_completed(good, 2)
        assert sample(bed, "gateway_connections_closed_total", reason="no_request") == 40
        assert sample(bed, "gateway_requests_rejected_total", reason="body_timeout") == 20
        # Logged as they came up to a small burst, the rest summed up: 40 in all.
        await eventually(lambda: summed_up(logs, "bad connections", "no_request") > 0)
        logged = logs.warnings("closed a connection: no request within 0.5 s")
        assert 0 < len(logged) <= CONNECTION_LOG_BURST
        assert len(logged) + summed_up(logs, "bad connections", "no_request") == 40
        logs.assert_quiet()


async def test_health_answers_while_thousands_of_idle_sockets_are_held(
    logs: LogCapture, eventually: Eventually
) -> None:
    """Under a 1024-descriptor limit, 1100 idle sockets used to make /healthz time out: the
    gateway raises its soft limit to the hard one at start, as this test does."""
    _, soft, _ = raise_open_file_limit()
    held_n = min(2000, (soft - 800) // 2)  # each is two descriptors here: ours and the gateway's
    if held_n < 1100:
        pytest.skip(f"the hard open-file limit ({soft}) is too low to hold 1100 sockets here")
    async with test_bed(quick_emulator(SPEED), http_header_timeout_s=120.0) as bed:
        loop = asyncio.get_running_loop()
        held: list[socket.socket] = []
        try:
            for _ in range(held_n):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                held.append(sock)
                await loop.sock_connect(sock, ("127.0.0.1", gateway_port(bed)))
            opened = "gateway_connections_open"
            await eventually(lambda: sample(bed, opened) >= held_n)
            for path, body in (("/healthz", "ok\n"), ("/readyz", "ready\n")):
                async with bed.http.get(bed.gateway_url + path) as resp:
                    assert (resp.status, await resp.text()) == (200, body)
            good = await bed.caller(speed=SPEED).place_call()
            await say_and_hear(good, 1)
            await good.hangup()
        finally:
            for sock in held:
                sock.close()
        assert_completed(good, 1)
        logs.assert_quiet()


# ----------------------------------------------------------------- media streams


async def test_upgrades_without_start_are_closed_once_quiet_past_the_grace(
    logs: LogCapture, eventually: Eventually
) -> None:
    async with test_bed(quick_emulator(SPEED), max_calls=2, start_timeout_s=60.0) as bed:
        # A signed upgrade is the same for every call: anyone who saw one can hold streams.
        # Taken however many come at once (a burst of Twilio's looks the same until `start`).
        held = [await open_stream(bed) for _ in range(12)]
        waiting = "gateway_streams_waiting"
        await eventually(lambda: sample(bed, waiting) == 12)
        await asyncio.sleep(START_GRACE_S)
        # More wait than could become calls (2): the next upgrade closes the oldest quiet for
        # the grace, until as many wait as could start, itself included.
        good = await bed.caller(speed=SPEED).place_call()
        await say_and_hear(good, 1)
        evicted = [await closed_with(ws) for ws in held[:11]]
        assert evicted == [(1008, "too many streams waiting for start")] * 11
        assert not held[11].closed
        assert sample(bed, waiting) == 1
        # The call counts against MAX_CALLS; the stream still waiting does not.
        async with bed.http.get(bed.gateway_url + "/readyz") as resp:
            assert resp.status == 200
        await held[11].close()
        await say_and_hear(good, 2, freq=380.0)
        await good.hangup()

        assert_completed(good, 2)
        label = "too_many_streams_waiting_for_start"
        assert sample(bed, "gateway_stream_errors_total", reason=label) == 11
        assert bed.emulator.record.connections and len(bed.emulator.record.connections) == 1
        logs.assert_quiet()


class RawStream:
    """A media stream over a bare socket: frames written by hand, nothing read unless asked.

    With a small receive buffer it holds little of what it is sent: a caller that stops
    reading, which aiohttp's client (it reads everything into memory) cannot play.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, bed: TestBed, receive_buffer: int = 4096) -> RawStream:
        reader, writer = await raw_connect(bed, receive_buffer)
        key = base64.b64encode(os.urandom(16)).decode()
        signature = SIGNER.compute_signature(STREAM_URL, {})
        writer.write(
            "GET /twilio/media HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"X-Twilio-Signature: {signature}\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        return cls(reader, writer)

    def send(self, text: str) -> None:
        """One masked text frame, as a client must send it."""
        payload = text.encode()
        n = len(payload)
        assert n < 65536
        size = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
        mask = os.urandom(4)
        key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
        masked = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")
        self.writer.write(b"\x81" + size + mask + masked)


def media_frame(stream_sid: str, n: int, ulaw: bytes) -> str:
    return json.dumps(
        {
            "event": "media",
            "sequenceNumber": str(n + 2),
            "streamSid": stream_sid,
            "media": {
                "track": "inbound",
                "chunk": str(n + 1),
                "timestamp": str(20 * n),
                "payload": base64.b64encode(ulaw).decode(),
            },
        }
    )


def stream_sid_of(start: str) -> str:
    sid: str = json.loads(start)["streamSid"]
    return sid


async def test_a_caller_that_stops_reading_is_cut_and_its_call_cleaned_up(
    logs: LogCapture, eventually: Eventually
) -> None:
    # Replies far longer than every buffer on the way (the socket's, ours) can hold.
    config = quick_emulator(SPEED, reply_s=30.0)
    async with test_bed(config, caller_send_buffer_s=1.0) as bed:
        good = await bed.caller(speed=SPEED).place_call()
        call_sid = new_sid("CA")
        start = start_message(
            call_sid, stream_parameters((await post_voice(bed, voice_params(call_sid)))[1])
        )
        deaf = await RawStream.open(bed)
        deaf.send(start)
        sid = stream_sid_of(start)
        cut = "gateway_stream_errors_total"

        async def speak_and_never_listen() -> int:
            """Twilio's pace: 20 ms of audio every 20 ms (at the test's speed), a tone first."""
            tone = tone_ulaw(340.0, 0.6)
            audio = [tone[i : i + 160] for i in range(0, len(tone), 160)]
            n = 0
            while sample(bed, cut, reason="slow_consumer") == 0 and n < 3000:
                frame = audio[n] if n < len(audio) else b"\xff" * 160
                try:
                    deaf.send(media_frame(sid, n, frame))
                    await deaf.writer.drain()
                except ConnectionError:
                    break
                n += 1
                await asyncio.sleep(0.02 / SPEED)
            return n

        sent, _ = await asyncio.gather(speak_and_never_listen(), say_and_hear(good, 1))
        deaf.writer.close()
        await good.hangup()

        assert sample(bed, cut, reason="slow_consumer") == 1
        assert sent < 3000
        # What ever waited for a caller's socket, over both calls: the deaf one's backlog
        # reached the limit, plus one frame at most, and was never more.
        backlog = "gateway_caller_send_backlog_seconds"
        assert sample(bed, backlog + "_count") == 2
        assert 1.0 < sample(bed, backlog + "_sum") <= 1.0 + 0.1
        assert sample(bed, backlog + "_bucket", le="0.05") == 1  # the good call: nothing waited
        # The deaf call was cleaned up: its Live connection closed, no call left.
        await eventually(lambda: all(c.closed_at for c in bed.emulator.record.connections))
        assert len(bed.emulator.record.connections) == 2
        assert sample(bed, "gateway_calls_active") == 0
        assert_completed(good, 1)
        assert logs.warnings("stream closed: slow consumer") == [
            "stream closed: slow consumer: caller not reading"
        ]
        logs.assert_quiet()


@contextlib.asynccontextmanager
async def slow_to_answer(url: str, delay_s: float) -> AsyncIterator[str]:
    """A TCP relay to `url` that waits `delay_s` before passing anything on: a Live service
    slow to set up (TLS passes through it untouched). Yields the relay's https URL."""
    target = urlsplit(url)
    host, port = target.hostname or "127.0.0.1", target.port or 443

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(delay_s)
        up_reader, up_writer = await asyncio.open_connection(host, port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    try:
        yield f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


async def test_caller_audio_faster_than_real_time_is_refused_during_a_slow_setup(
    logs: LogCapture, eventually: Eventually
) -> None:
    async with (
        test_bed(quick_emulator(SPEED), caller_audio_rate=SPEED, caller_audio_burst_s=2.0) as bed,
        slow_to_answer(bed.emulator.base_url, delay_s=2.0) as slow_url,
    ):
        assert bed.emulator.tls is not None
        with environment(
            GOOGLE_GEMINI_BASE_URL=slow_url, SSL_CERT_FILE=bed.emulator.tls.ca_pem_path
        ):
            client = genai.Client(api_key=bed.emulator.config.api_key)
        app = create_app(
            bed.settings, PersonaTable.from_settings(bed.settings), client=client, metrics=Metrics()
        )
        runner = await start_server(app, "127.0.0.1", 0)
        slow = replace(
            bed,
            app=app,
            metrics=app[STATE].metrics,
            gateway_url=f"http://127.0.0.1:{runner.addresses[0][1]}",
        )
        try:
            good = await slow.caller(speed=SPEED).place_call()
            call_sid = new_sid("CA")
            parameters = stream_parameters((await post_voice(slow, voice_params(call_sid)))[1])
            flood = await open_stream(slow)
            start = start_message(call_sid, parameters)
            await flood.send_str(start)
            loop = asyncio.get_running_loop()
            began = loop.time()
            sent = 0
            silence = b"\xff" * 160
            with contextlib.suppress(ConnectionError, aiohttp.ClientError):
                for n in range(3000):  # a minute of audio, as fast as the socket takes it
                    await flood.send_str(media_frame(stream_sid_of(start), n, silence))
                    sent += 1
            closed = await closed_with(flood)
            elapsed = loop.time() - began
            await say_and_hear(good, 1)
            await good.hangup()
        finally:
            await runner.cleanup()

        assert closed == (1008, "caller audio faster than real time")
        # What the gateway took from the flood before it closed it: no more than real time
        # since its first frame (at the allowed rate) plus the burst, however long that was.
        frames = sample(slow, "gateway_caller_audio_frames_total")
        flooded = frames - len(good.record.sent_ulaw) // 160
        assert flooded <= (SPEED * elapsed + 2.0) / 0.02 + 1
        assert flooded < sent or sent < 3000
        label = "caller_audio_faster_than_real_time"
        assert sample(slow, "gateway_stream_errors_total", reason=label) == 1
        assert_completed(good, 1)
        logs.assert_quiet()


FLOODER = r"""
import socket, sys, time
port, n, hold_s = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
sys.stdin.readline()
held = []
for _ in range(n):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex(("127.0.0.1", port))
    held.append(s)
time.sleep(hold_s)
for s in held:
    s.close()
print("done", flush=True)
"""


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
async def test_running_out_of_descriptors_is_counted_and_logged_once_per_interval(
    logs: LogCapture, eventually: Eventually
) -> None:
    """Past the open-file limit the gateway can accept nothing (that is the operator's limit
    to set); what it must not do is write an ERROR per failed accept, or stay down."""
    async with test_bed(quick_emulator(SPEED), http_header_timeout_s=1.0) as bed:
        # Another process holds the sockets, so only the gateway's side uses our descriptors.
        flooder = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            FLOODER,
            str(gateway_port(bed)),
            "300",
            "4",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert flooder.stdin is not None and flooder.stdout is not None
        soft, hard = open_file_limit()
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_descriptors() + 40, hard))
        try:
            flooder.stdin.write(b"go\n")
            await flooder.stdin.drain()
            async with asyncio.timeout(30):
                assert await flooder.stdout.readline() == b"done\n"
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        await flooder.wait()
        # Back to normal once the sockets are gone (those accepted, the deadline closed).
        await eventually(lambda: sample(bed, "gateway_connections_open") == 0)
        async with bed.http.get(bed.gateway_url + "/healthz") as resp:
            assert resp.status == 200
        good = await bed.caller(speed=SPEED).place_call()
        await say_and_hear(good, 1)
        await good.hangup()
        errors = sample(bed, "gateway_accept_errors_total", reason="EMFILE")
    # The app's cleanup sums up what its throttles still held.
    assert errors >= 2
    lines = logs.warnings("cannot accept connections: EMFILE")
    assert len(lines) <= 1 + errors // 2
    assert len(lines) + summed_up(logs, "accept errors", "EMFILE") == errors
    assert_completed(good, 1)
    logs.assert_quiet()
