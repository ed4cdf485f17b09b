"""The Twilio caller simulator, checked against a small scripted aiohttp server.

The server checks signatures with twilio's own RequestValidator and hands each stream to the
test, which plays the gateway's part message by message.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import quoteattr

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from twilio.request_validator import RequestValidator

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

from gateway.testing.analysis import (
    HeardReply,
    heard_pieces,
    heard_playings,
    heard_replies,
    segments,
    timeline,
)
from gateway.testing.live_emulator import REPLY_LEVELS, reply_freq
from gateway.testing.twilio_sim import (
    FRAME_BYTES,
    FRAME_SECONDS,
    CallRecord,
    CallRejected,
    HeardAudio,
    SimulatedCall,
    StreamRejected,
    TwilioCallerSimulator,
    dominant_frequency,
    tone_ulaw,
)

if TYPE_CHECKING:
    from conftest import Eventually

TOKEN = "test-auth-token"
PUBLIC = "https://gw.example.com"
STREAM_URL = "wss://gw.example.com/twilio/stream"

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


@dataclass
class Stream:
    """Server side of one Media Stream: what arrived, and the socket to answer on."""

    ws: web.WebSocketResponse
    transport: asyncio.BaseTransport | None = None  # to cut the connection without a close
    inbox: asyncio.Queue[tuple[float, dict[str, Any] | None]] = field(default_factory=asyncio.Queue)
    stream_sid: str = ""

    async def next(self, limit: float = 5.0) -> dict[str, Any]:
        _, msg = await asyncio.wait_for(self.inbox.get(), limit)
        assert msg is not None, "stream closed"
        return msg

    async def next_timed(self, limit: float = 5.0) -> tuple[float, dict[str, Any]]:
        at, msg = await asyncio.wait_for(self.inbox.get(), limit)
        assert msg is not None, "stream closed"
        return at, msg

    async def next_event(self, event: str, limit: float = 5.0) -> tuple[float, dict[str, Any]]:
        """Skip caller media until ``event`` arrives."""
        while True:
            at, msg = await self.next_timed(limit)
            if msg["event"] == event:
                return at, msg

    async def send(self, msg: dict[str, Any]) -> float:
        await self.ws.send_str(json.dumps(msg))
        return time.monotonic()

    async def play(self, ulaw: bytes, chunk: int = 160) -> None:
        for i in range(0, len(ulaw), chunk):
            payload = base64.b64encode(ulaw[i : i + chunk]).decode()
            await self.send(
                {"event": "media", "streamSid": self.stream_sid, "media": {"payload": payload}}
            )

    async def mark(self, name: str) -> float:
        return await self.send(
            {"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}}
        )

    async def clear(self) -> float:
        return await self.send({"event": "clear", "streamSid": self.stream_sid})


@dataclass
class Seen:
    """What the scripted server saw: webhook forms, and each accepted stream."""

    forms: list[dict[str, Any]] = field(default_factory=list)
    streams: asyncio.Queue[Stream] = field(default_factory=asyncio.Queue)
    # <Connect action> requests and stream status callbacks, as (path, form).
    actions: list[dict[str, Any]] = field(default_factory=list)
    statuses: list[dict[str, Any]] = field(default_factory=list)
    # What each action request is answered with, in turn (then an empty <Response/>).
    next_twiml: list[str] = field(default_factory=list)
    hits: list[str] = field(default_factory=list)  # every request's path, in order


#: A <Connect> that goes on to its (relative) action and reports its stream's status.
CONNECT_WITH_ACTION = (
    '<Response><Connect action="/twilio/next">'
    f'<Stream url="{STREAM_URL}" statusCallback="/twilio/stream-status">'
    '<Parameter name="leg" value="{leg}"/>'
    "</Stream></Connect></Response>"
)


def make_app(seen: Seen) -> web.Application:
    validator = RequestValidator(TOKEN)
    app = web.Application()

    async def voice(request: web.Request) -> web.Response:
        form = dict(await request.post())
        sig = request.headers.get("X-Twilio-Signature", "")
        if not validator.validate(PUBLIC + "/twilio/voice", form, sig):
            return web.Response(status=403, text="bad signature")
        seen.forms.append(form)
        seen.hits.append(request.path)
        if form["To"] == "+15550000000":
            twiml = "<Response><Reject/></Response>"
        elif form["To"] == "+15550000001":
            twiml = CONNECT_WITH_ACTION.replace("{leg}", "1")
        else:
            twiml = (
                "<Response><Connect>"
                f'<Stream url="{STREAM_URL}">'
                f'<Parameter name="caller" value={quoteattr(str(form["From"]))}/>'
                '<Parameter name="note" value="a &amp; b"/>'
                "</Stream></Connect></Response>"
            )
        return web.Response(text=twiml, content_type="text/xml")

    async def stream(request: web.Request) -> web.StreamResponse:
        sig = request.headers.get("X-Twilio-Signature", "")
        if not validator.validate(STREAM_URL, {}, sig):
            return web.Response(status=403, text="bad stream signature")
        seen.hits.append(request.path)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        conn = Stream(ws, request.transport)
        seen.streams.put_nowait(conn)
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                parsed = json.loads(msg.data)
                if parsed["event"] == "start":
                    conn.stream_sid = parsed["start"]["streamSid"]
                conn.inbox.put_nowait((time.monotonic(), parsed))
        conn.inbox.put_nowait((time.monotonic(), None))
        return ws

    async def callback(request: web.Request) -> web.Response:
        form = dict(await request.post())
        sig = request.headers.get("X-Twilio-Signature", "")
        if not validator.validate(PUBLIC + request.path, form, sig):
            return web.Response(status=403, text="bad signature")
        seen.hits.append(request.path)
        if request.path == "/twilio/stream-status":
            seen.statuses.append(form)
            return web.Response(status=204)
        seen.actions.append(form)
        twiml = seen.next_twiml.pop(0) if seen.next_twiml else "<Response/>"
        return web.Response(text=twiml, content_type="text/xml")

    app.router.add_post("/twilio/voice", voice)
    app.router.add_get("/twilio/stream", stream)
    app.router.add_post("/twilio/next", callback)
    app.router.add_post("/twilio/stream-status", callback)
    return app


@dataclass
class Harness:
    seen: Seen
    http: aiohttp.ClientSession
    base_url: str

    def sim(self, speed: float = 1.0, token: str = TOKEN) -> TwilioCallerSimulator:
        return TwilioCallerSimulator(self.http, self.base_url, PUBLIC, token, speed=speed)

    async def call(self, speed: float = 1.0) -> tuple[SimulatedCall, Stream]:
        call = await self.sim(speed).place_call()
        conn: Stream = await asyncio.wait_for(self.seen.streams.get(), 5)
        assert (await conn.next())["event"] == "connected"
        assert (await conn.next())["event"] == "start"
        return call, conn


@pytest.fixture
async def harness(aiohttp_server: ServerFactory) -> AsyncIterator[Harness]:
    seen = Seen()
    server = await aiohttp_server(make_app(seen))
    async with aiohttp.ClientSession() as http:
        yield Harness(seen, http, str(server.make_url("")).rstrip("/"))


def pcm_of(ulaw: bytes) -> np.ndarray:
    return np.frombuffer(audioop.ulaw2lin(ulaw, 2), dtype=np.int16)


def test_tone_helpers_round_trip() -> None:
    ulaw = tone_ulaw(440.0, 0.5)
    assert len(ulaw) == 4000
    assert dominant_frequency(pcm_of(ulaw), 8000) == pytest.approx(440.0, abs=3.0)
    assert dominant_frequency(pcm_of(tone_ulaw(1234.0, 0.25)), 8000) == pytest.approx(
        1234.0, abs=5.0
    )
    assert dominant_frequency(np.zeros(800, dtype=np.int16), 8000) == 0.0


def reply_ulaw(n: int, from_s: float, to_s: float, reply_s: float = 0.8) -> bytes:
    """Part of the emulator's reply n as the caller hears it: 8 kHz mu-law, level rising."""
    t = np.arange(round(from_s * 8000), round(to_s * 8000)) / 8000
    low, high = REPLY_LEVELS
    level = low + (high - low) * t / reply_s
    pcm = (level * 32767 * np.sin(2 * np.pi * reply_freq(n) * t)).astype("<i2")
    return audioop.lin2ulaw(pcm.tobytes(), 2)


def played(*parts: tuple[float, float, float]) -> CallRecord:
    """A call whose caller heard reply 3's (from_s, to_s) parts, each starting at `at`."""
    record = CallRecord(speed=1.0)
    record.events.append((100.0, "start_tx", ""))
    for at, from_s, to_s in parts:
        for i, start in enumerate(np.arange(from_s, to_s - 1e-9, 0.04)):
            chunk = reply_ulaw(3, start, min(to_s, start + 0.04))
            record.heard.append(HeardAudio(100.0 + at + i * 0.04, chunk))
    return record


def test_playings_tell_a_stall_from_a_reply_said_again() -> None:
    """By where in the reply each run begins: one that goes on after a stall (of any length)
    is the same playing; one that starts from the top again is another."""
    [stalled] = heard_playings(played((1.0, 0.0, 0.3), (1.6, 0.3, 0.8)))  # a 0.3-s stall
    assert stalled.n == 3 and stalled.sound_s == pytest.approx(0.8, abs=0.045)
    assert stalled.first_pos == pytest.approx(0.0, abs=0.05)
    assert stalled.last_pos == pytest.approx(1.0, abs=0.05)
    cut_then_again = heard_playings(played((1.0, 0.0, 0.4), (1.44, 0.0, 0.8)))
    assert [round(p.sound_s, 1) for p in cut_then_again] == [0.4, 0.8]
    assert cut_then_again[0].last_pos == pytest.approx(0.5, abs=0.05)
    whole_then_again = heard_playings(played((1.0, 0.0, 0.8), (1.84, 0.0, 0.3)))
    assert [round(p.sound_s, 1) for p in whole_then_again] == [0.8, 0.3]
    # A stall just before the end leaves a run too short for a line: it still goes on.
    [late_stall] = heard_playings(played((1.0, 0.0, 0.74), (1.82, 0.74, 0.8)))
    assert late_stall.sound_s == pytest.approx(0.8, abs=0.045)
    # heard_replies reads a reply cut and at once said again as one (by the gap), and a
    # stalled playing as one however long the stall (by where the run goes on).
    assert len(heard_replies(played((1.0, 0.0, 0.4), (1.44, 0.0, 0.8)))) == 1
    [stalled_reply] = heard_replies(played((1.0, 0.0, 0.3), (1.6, 0.3, 0.8)))
    assert stalled_reply.sound_s == pytest.approx(0.8, abs=0.045)
    assert stalled_reply.duration_s == pytest.approx(1.1, abs=0.045)


def test_heard_pieces_from_a_moment_are_the_call_s_pieces_after_it() -> None:
    """Reading only the recent part of a call (as await_reply does) splits, times and joins
    runs exactly as reading the whole call does."""
    record = CallRecord(speed=2.0)
    record.events.append((100.0, "start_tx", ""))
    at = 100.0
    stalls = {(4, 9): 0.03, (5, 12): 0.0568}  # 0.06 s and 0.11 s of the timeline
    for n in range(1, 7):  # replies of 0.8 s in 40-ms chunks, 0.5 s apart, two stalled
        for i in range(20):
            record.heard.append(HeardAudio(at, tone_ulaw(reply_freq(n), 0.04)))
            at += 0.02 + stalls.get((n, i), 0.0)
        at += 0.25
    _, heard = timeline(record)
    whole = [(round(s.start_s, 3), round(s.duration_s, 3)) for s in segments(heard)]
    assert len(whole) == 8  # six replies, two of them in two runs
    # The first stall is under PLAYBACK_GAP_S, the second is not; the tone's level does not
    # change, so each run is read as going on where the one before stopped: one reply.
    assert [r.n for r in heard_pieces(record)] == [1, 2, 3, 4, 4, 5, 5, 6]
    assert [r.n for r in heard_replies(record)] == [1, 2, 3, 4, 5, 6]
    for since in (0.0, 1.0, 2.2, 3.5, 5.0, 6.6):  # between replies
        assert runs(heard_pieces(record, since_s=since)) == [w for w in whole if w[0] >= since]
        expected = [r for r in heard_replies(record) if r.start_s >= since]
        assert heard_replies(record, since_s=since) == expected, since
    # From inside a reply: its run is read from there.
    assert runs(heard_pieces(record, since_s=2.9)) == [(2.9, 0.5), *whole[3:]]


def runs(pieces: list[HeardReply]) -> list[tuple[float, float]]:
    return [(round(p.start_s, 3), round(p.duration_s, 3)) for p in pieces]


async def test_signed_webhook_and_stream_start(harness: Harness) -> None:
    sim = harness.sim()
    call = await sim.place_call(call_sid="CA" + "1" * 32, from_="+15551230000")
    conn: Stream = await asyncio.wait_for(harness.seen.streams.get(), 5)
    async with call:
        form = harness.seen.forms[0]
        assert form["CallSid"] == "CA" + "1" * 32
        assert form["From"] == "+15551230000"
        assert form["Direction"] == "inbound"
        assert form["CallStatus"] == "ringing"
        assert re.fullmatch(r"AC[0-9a-f]{32}", form["AccountSid"])

        connected = await conn.next()
        assert connected == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
        start = await conn.next()
        assert start["event"] == "start"
        assert start["sequenceNumber"] == "1"
        body = start["start"]
        assert start["streamSid"] == body["streamSid"] == call.stream_sid
        assert re.fullmatch(r"MZ[0-9a-f]{32}", body["streamSid"])
        assert body["callSid"] == "CA" + "1" * 32
        assert body["accountSid"] == form["AccountSid"]
        assert body["tracks"] == ["inbound"]
        assert body["mediaFormat"] == {
            "encoding": "audio/x-mulaw",
            "sampleRate": 8000,
            "channels": 1,
        }
        assert body["customParameters"] == {"caller": "+15551230000", "note": "a & b"}
        assert call.record.custom_parameters == body["customParameters"]
        assert call.record.stream_url == STREAM_URL

        await call.send_dtmf("7")
        dtmf = await conn.next()
        assert dtmf["event"] == "dtmf"
        assert dtmf["dtmf"] == {"track": "inbound_track", "digit": "7"}
        assert dtmf["streamSid"] == call.stream_sid
        with pytest.raises(ValueError):
            await call.send_dtmf("x")

    stop = await conn.next()
    assert stop["event"] == "stop"
    assert stop["stop"] == {"accountSid": form["AccountSid"], "callSid": "CA" + "1" * 32}
    _, end = await conn.inbox.get()
    assert end is None  # the socket closed after stop
    assert call.record.closed_by == "caller"
    await call.hangup()  # idempotent


async def test_wrong_token_is_rejected_by_signature_check(harness: Harness) -> None:
    with pytest.raises(CallRejected) as err:
        await harness.sim(token="wrong").place_call()
    assert err.value.status == 403
    assert not isinstance(err.value, StreamRejected)


async def test_reject_twiml_raises(harness: Harness) -> None:
    with pytest.raises(CallRejected) as err:
        await harness.sim().place_call(to="+15550000000")
    assert err.value.status == 200
    assert "<Reject" in err.value.body


async def test_media_frames_count_order_and_pacing(harness: Harness) -> None:
    call, conn = await harness.call(speed=5.0)
    async with call:
        ulaw = tone_ulaw(300.0, 1.0)
        t0 = time.monotonic()
        await call.send_audio(ulaw)
        await call.silence(0.1)
        elapsed = time.monotonic() - t0
        frames = [await conn.next_timed() for _ in range(55)]
    assert [m["event"] for _, m in frames] == ["media"] * 55
    assert [int(m["sequenceNumber"]) for _, m in frames] == list(range(2, 57))
    assert [int(m["media"]["chunk"]) for _, m in frames] == list(range(1, 56))
    stamps = [int(m["media"]["timestamp"]) for _, m in frames]
    assert all(b - a >= 20 for a, b in itertools.pairwise(stamps))
    assert all(m["media"]["track"] == "inbound" for _, m in frames)
    payloads = [base64.b64decode(m["media"]["payload"]) for _, m in frames]
    assert all(len(p) == 160 for p in payloads)
    assert b"".join(payloads[:50]) == ulaw
    assert b"".join(payloads[50:]) == b"\xff" * 800
    assert bytes(call.record.sent_ulaw) == b"".join(payloads)
    # Paced, not dumped: 55 frames at 4 ms spacing take at least ~0.2 s.
    assert elapsed >= 0.18
    arrivals = [at for at, _ in frames]
    assert arrivals[49] - arrivals[0] >= 0.15


async def test_mark_echoed_after_preceding_audio_played(harness: Harness) -> None:
    call, conn = await harness.call(speed=2.0)
    async with call:
        await conn.mark("m0")  # nothing queued: echoed right away
        t_audio = time.monotonic()
        await conn.play(tone_ulaw(500.0, 0.5))  # 0.25 s of play at speed 2
        await conn.mark("m1")
        at0, echo0 = await conn.next_event("mark")
        at1, echo1 = await conn.next_event("mark")
    assert echo0["mark"] == {"name": "m0"}
    assert echo1["mark"] == {"name": "m1"}
    assert echo1["streamSid"] == call.stream_sid
    assert int(echo1["sequenceNumber"]) > int(echo0["sequenceNumber"]) > 1
    assert at1 - t_audio >= 0.2  # not before the audio in front of it could play
    assert at1 - at0 >= 0.2
    rec = call.record
    assert [name for _, name in rec.marks_echoed] == ["m0", "m1"]
    assert rec.marks_received == ["m0", "m1"]
    assert sum(len(h.ulaw) for h in rec.heard) == 4000
    assert rec.marks_echoed[1][0] >= rec.heard[-1].at + 160 / 16000 - 1e-6  # after it played


async def test_clear_drops_queue_and_echoes_pending_marks(harness: Harness) -> None:
    call, conn = await harness.call(speed=1.0)
    async with call:
        await conn.play(tone_ulaw(440.0, 3.0), chunk=4000)  # six 0.5 s chunks
        await conn.mark("m1")
        await conn.play(tone_ulaw(880.0, 1.0), chunk=4000)
        await conn.mark("m2")
        await call.wait_heard(lambda r: len(r.heard) >= 2, timeout=5)
        await asyncio.sleep(0.1)
        t_clear = await conn.clear()
        _, echo1 = await conn.next_event("mark")
        at2, echo2 = await conn.next_event("mark")
        assert [echo1["mark"]["name"], echo2["mark"]["name"]] == ["m1", "m2"]
        # Pending marks come back at once, not after the ~3 s of audio that was queued.
        assert at2 - t_clear < 1.0

        # Playback goes on normally after a clear.
        await conn.play(tone_ulaw(1000.0, 0.2))
        await conn.mark("m3")
        _, echo3 = await conn.next_event("mark")
        assert echo3["mark"]["name"] == "m3"

    rec = call.record
    assert len(rec.clears) == 1
    cut = rec.heard[1]
    assert 0 < len(cut.ulaw) < 4000  # the chunk playing at the clear was cut short
    assert len(rec.heard) == 2 + 10  # then only the 1 kHz audio
    pcm = rec.heard_pcm()
    before = pcm[: 4000 + len(cut.ulaw)]
    assert dominant_frequency(before, 8000) == pytest.approx(440.0, abs=5.0)
    assert dominant_frequency(pcm[-1600:], 8000) == pytest.approx(1000.0, abs=10.0)
    heard_440 = len(before)
    assert heard_440 < 3 * 8000  # most of the 440 Hz tone was dropped, none of 880 Hz heard
    assert [n for _, n in rec.marks_echoed] == ["m1", "m2", "m3"]


async def test_heard_pcm_timeline_and_frequencies(harness: Harness) -> None:
    call, conn = await harness.call(speed=4.0)
    async with call:
        await conn.play(tone_ulaw(600.0, 0.3))
        await conn.mark("a")
        await conn.next_event("mark")
        await asyncio.sleep(0.1)  # >= 0.4 s of silence on the caller's timeline
        await conn.play(tone_ulaw(1200.0, 0.3))
        await conn.mark("b")
        await conn.next_event("mark")
    pcm = call.record.heard_pcm()
    assert pcm.dtype == np.int16
    assert dominant_frequency(pcm[:2400], 8000) == pytest.approx(600.0, abs=8.0)
    assert dominant_frequency(pcm[-2400:], 8000) == pytest.approx(1200.0, abs=8.0)
    gap = pcm[2400:-2400]
    assert len(gap) >= 3000 and not np.any(gap)


async def test_bad_outbound_messages_are_recorded_not_fatal(harness: Harness) -> None:
    call, conn = await harness.call(speed=4.0)
    async with call:
        sid = conn.stream_sid
        await conn.ws.send_str("{not json")
        await conn.send({"event": "media", "streamSid": "MZbogus", "media": {"payload": "/w=="}})
        await conn.send({"event": "dance", "streamSid": sid})
        await conn.send({"event": "media", "streamSid": sid, "media": {"payload": "!!"}})
        await conn.send({"event": "mark", "streamSid": sid, "mark": {}})
        await conn.ws.send_bytes(b"\x00\x01")
        await conn.mark("ok")
        _, echo = await conn.next_event("mark")
        assert echo["mark"]["name"] == "ok"
    errors = call.record.protocol_errors
    assert len(errors) == 6, errors
    assert call.record.heard == []


async def test_gateway_close_is_recorded(harness: Harness) -> None:
    call, conn = await harness.call()
    await conn.ws.close(code=4001, message=b"bye now")
    await call.wait_closed(timeout=5)
    rec = call.record
    assert rec.close_code == 4001
    assert rec.close_reason == "bye now"
    assert rec.closed_by == "gateway"
    with pytest.raises(TimeoutError):
        await call.wait_heard(lambda r: len(r.heard) > 0, timeout=5)
    await call.send_audio(b"\xff" * 320)  # no-op after close, no crash
    await call.hangup()
    await call.hangup()


async def test_many_concurrent_calls(harness: Harness) -> None:
    n = 30

    async def one() -> CallRecord:
        async with await harness.sim(speed=10.0).place_call() as call:
            await call.speak_tone(400.0, 0.2)
            return call.record

    records = await asyncio.gather(*(one() for _ in range(n)))
    assert len({r.call_sid for r in records}) == n
    conns: list[Stream] = [harness.seen.streams.get_nowait() for _ in range(n)]
    for conn in conns:
        events = []
        while True:
            _, msg = await asyncio.wait_for(conn.inbox.get(), 5)
            if msg is None:
                break
            events.append(msg["event"])
        assert events == ["connected", "start", *["media"] * 10, "stop"]


# ------------------------------------------------------------ <Connect action>, status callbacks


async def start_of(harness: Harness) -> Stream:
    conn: Stream = await asyncio.wait_for(harness.seen.streams.get(), 5)
    assert (await conn.next())["event"] == "connected"
    assert (await conn.next())["event"] == "start"
    return conn


async def test_connect_action_continues_the_call_on_a_new_stream(
    harness: Harness, eventually: Eventually
) -> None:
    seen = harness.seen
    seen.next_twiml.append(CONNECT_WITH_ACTION.replace("{leg}", "2"))
    call = await harness.sim(speed=4.0).place_call(to="+15550000001")
    first = await start_of(harness)
    await first.ws.close(code=1000, message=b"handing over")
    second = await start_of(harness)
    record = call.record
    assert not call.closed and len(record.streams) == 2
    assert record.streams[0] != record.streams[1] == record.stream_sid
    assert record.custom_parameters == {"leg": "2"}
    # The action was signed, for the same call, as a call in progress.
    (action,) = seen.actions
    assert action["CallSid"] == record.call_sid and action["CallStatus"] == "in-progress"
    assert action["From"] == seen.forms[0]["From"] and action["To"] == "+15550000001"
    # Each stream's status: started, stopped (a close frame), started.
    await eventually(lambda: len(seen.statuses) == 3)
    assert [(f["StreamSid"], f["StreamEvent"]) for f in seen.statuses] == [
        (record.streams[0], "stream-started"),
        (record.streams[0], "stream-stopped"),
        (record.streams[1], "stream-started"),
    ]
    # The new stream carries the caller's audio, numbered from its own start.
    await call.speak_tone(400.0, 0.1)
    media = [await second.next_event("media") for _ in range(5)]
    assert [m["media"]["chunk"] for _, m in media] == ["1", "2", "3", "4", "5"]
    assert all(m["streamSid"] == record.stream_sid for _, m in media)
    # The second action answers <Response/>: the call ends with the stream.
    await second.ws.close(code=1000)
    await call.wait_closed(timeout=5)
    assert len(seen.actions) == 2 and record.closed_by == "gateway"
    assert [kind for kind, *_ in record.callbacks].count("action") == 2
    await call.hangup()


async def test_caller_audio_between_streams_is_kept_as_unsent(harness: Harness) -> None:
    seen = harness.seen
    seen.next_twiml.append(CONNECT_WITH_ACTION.replace("{leg}", "2"))
    call = await harness.sim(speed=4.0).place_call(to="+15550000001")
    first = await start_of(harness)
    speaking = asyncio.create_task(call.speak_tone(300.0, 2.0))
    await first.next_event("media")
    await first.ws.close(code=1000)
    second = await start_of(harness)
    await speaking
    sent_first = sent_second = 0
    while (msg := (await first.inbox.get())[1]) is not None:
        sent_first += msg["event"] == "media"
    await call.hangup()
    while (msg := (await second.inbox.get())[1]) is not None:
        sent_second += msg["event"] == "media"
    frames = round(2.0 / FRAME_SECONDS)
    unsent = len(call.record.unsent_ulaw) // FRAME_BYTES
    assert sent_first + 1 + sent_second + unsent == frames  # +1: the media read above
    assert call.record.closed_by == "caller" and call.closed


async def test_audio_after_the_hang_up_takes_its_time_and_sends_nothing(
    harness: Harness,
) -> None:
    """A caller who hung up sends nothing, but the audio's time passes: a test that talks
    until the call is closed (``while not call.closed: await call.silence(0.1)``) gives the
    loop's other tasks their turn. Returning at once, that loop spun, never yielding, and
    grew its record until the machine ran out of memory."""
    call, conn = await harness.call(speed=4.0)
    await call.hangup()
    while (await conn.inbox.get())[1] is not None:
        pass
    others_ran: list[bool] = []
    asyncio.get_running_loop().call_soon(others_ran.append, True)
    sent = len(call.record.sent_ulaw)
    t0 = time.monotonic()
    await call.silence(0.4)
    assert others_ran == [True]
    assert time.monotonic() - t0 >= 0.4 / 4.0 - 0.005  # its frames' time at speed 4
    assert len(call.record.sent_ulaw) == sent and not call.record.unsent_ulaw


@pytest.mark.parametrize("goes_on", [True, False])
async def test_a_stream_lost_without_a_close_frame(harness: Harness, goes_on: bool) -> None:
    """stream-error, then the action or not, as the knob says (Twilio does not document it)."""
    seen = harness.seen
    seen.next_twiml.append(CONNECT_WITH_ACTION.replace("{leg}", "2"))
    sim = TwilioCallerSimulator(
        harness.http, harness.base_url, PUBLIC, TOKEN, action_after_abnormal_close=goes_on
    )
    call = await sim.place_call(to="+15550000001")
    first = await start_of(harness)
    assert isinstance(first.transport, asyncio.Transport)
    first.transport.abort()  # a crashed server: no close frame
    if goes_on:
        await start_of(harness)
        assert len(call.record.streams) == 2 and not call.closed
        await call.hangup()
    else:  # the call stays up with no stream, until a REST redirect opens the next one
        await asyncio.sleep(0.5)
        assert seen.actions == [] and not call.closed and not call.streaming
        await call.redirect(CONNECT_WITH_ACTION.replace("{leg}", "2"))
        await start_of(harness)
        assert len(call.record.streams) == 2 and not call.closed
        await call.hangup()
    errors = [f for f in seen.statuses if f["StreamEvent"] == "stream-error"]
    assert [f["StreamSid"] for f in errors] == [call.record.streams[0]]
    closed = [detail for _, kind, detail in call.record.events if kind == "stream_closed"]
    assert closed[0] in ("1006 gateway", "None gateway"), closed


async def test_requests_spread_over_base_urls(
    aiohttp_server: ServerFactory, eventually: Eventually
) -> None:
    """Round robin over two servers: webhook, stream, status, action, stream, status..."""
    seens = [Seen(), Seen()]
    servers = [await aiohttp_server(make_app(seen)) for seen in seens]
    seens[0].next_twiml.append(CONNECT_WITH_ACTION.replace("{leg}", "2"))
    seens[1].next_twiml.append(CONNECT_WITH_ACTION.replace("{leg}", "2"))
    async with aiohttp.ClientSession() as http:
        bases = [str(server.make_url("")).rstrip("/") for server in servers]
        sim = TwilioCallerSimulator(http, bases, PUBLIC, TOKEN)
        call = await sim.place_call(to="+15550000001")
        first = await asyncio.wait_for(seens[1].streams.get(), 5)
        assert (await first.next())["event"] == "connected"
        await first.ws.close(code=1000)
        await eventually(lambda: len(call.record.streams) == 2)
        await call.hangup()
    assert seens[0].hits[0] == "/twilio/voice" and seens[1].hits[0] == "/twilio/stream"
    assert len(seens[0].hits) >= 3 and len(seens[1].hits) >= 3  # both served the call
