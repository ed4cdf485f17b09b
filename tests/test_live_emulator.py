"""The Live API emulator, driven by the real google-genai SDK over TLS."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import websockets
from google import genai
from google.genai import errors, types
from websockets.asyncio.client import connect as ws_connect

from gateway.testing.chaos import KINDS, Chaos, ChaosConfig
from gateway.testing.live_emulator import (
    CLOSE_REASONS,
    REASON_CANCELLED,
    REASON_DEADLINE,
    EmulatorConfig,
    LiveEmulator,
    format_duration,
    reply_freq,
)
from gateway.testing.tls import TestTLS, make_tls

MODEL = "gemini-3.8-live"
STEP_TIMEOUT = 5.0  # generous bound on any single wait; a hang fails instead of blocking
PATH = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TestTLS:
    return make_tls(tmp_path_factory.mktemp("tls"))


Factory = Callable[..., Awaitable[LiveEmulator]]


@pytest.fixture
async def emulator_factory(tls: TestTLS) -> AsyncIterator[Factory]:
    started: list[LiveEmulator] = []

    async def make(**knobs: Any) -> LiveEmulator:
        knobs.setdefault("reply_s", 0.4)
        knobs.setdefault("response_delay_s", 0.05)
        # Instant setups, forking resumes, a handle a second: what each test below relies
        # on unless it sets the knob it is about.
        knobs.setdefault("setup_latency", (0.0, 0.0))
        knobs.setdefault("concurrent_resume", "fork")
        knobs.setdefault("handle_interval", 1.0)
        emu = LiveEmulator(EmulatorConfig(**knobs), tls)
        await emu.start()
        started.append(emu)
        return emu

    yield make
    for emu in started:
        await emu.stop()


def make_client(emu: LiveEmulator, tls: TestTLS, api_key: str = "test-key") -> genai.Client:
    options = types.HttpOptions(base_url=emu.base_url, async_client_args={"ssl": tls.client_ssl})
    return genai.Client(api_key=api_key, http_options=options)


def live_config(
    handle: str | None = None, resumption: bool = True, compression: bool = False
) -> types.LiveConnectConfig:
    return types.LiveConnectConfig(
        response_modalities=[types.Modality.AUDIO],
        session_resumption=types.SessionResumptionConfig(handle=handle) if resumption else None,
        context_window_compression=(
            types.ContextWindowCompressionConfig(sliding_window=types.SlidingWindow())
            if compression
            else None
        ),
        input_audio_transcription=types.AudioTranscriptionConfig(),
        output_audio_transcription=types.AudioTranscriptionConfig(),
    )


def tone(freq: float, seconds: float, amp: float = 0.3) -> bytes:
    t = np.arange(int(16000 * seconds)) / 16000
    return (amp * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


def silence(seconds: float) -> bytes:
    return bytes(int(16000 * seconds) * 2)


UTTERANCE = tone(300, 0.3) + silence(0.6)


def dominant_freq(pcm: bytes, rate: int = 24000) -> float:
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[int(np.argmax(spectrum))])


async def send_pcm(session: Any, pcm: bytes) -> None:
    for i in range(0, len(pcm), 640):
        blob = types.Blob(data=pcm[i : i + 640], mime_type="audio/pcm;rate=16000")
        await session.send_realtime_input(audio=blob)


class Reader:
    """Every server message in order, across turns, through the public ``receive()``."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.gen: AsyncIterator[types.LiveServerMessage] | None = None

    async def next(self) -> types.LiveServerMessage:
        while True:
            if self.gen is None:
                self.gen = self.session.receive()
            try:
                async with asyncio.timeout(STEP_TIMEOUT):
                    return await anext(self.gen)
            except StopAsyncIteration:
                self.gen = None

    async def until(
        self, pred: Callable[[types.LiveServerMessage], bool]
    ) -> list[types.LiveServerMessage]:
        seen: list[types.LiveServerMessage] = []
        while True:
            msg = await self.next()
            seen.append(msg)
            if pred(msg):
                return seen


def turn_complete(m: types.LiveServerMessage) -> bool:
    return bool(m.server_content and m.server_content.turn_complete)


def new_handle(m: types.LiveServerMessage) -> bool:
    u = m.session_resumption_update
    return bool(u and u.resumable and u.new_handle)


def reply_audio(msgs: list[types.LiveServerMessage]) -> bytes:
    return b"".join(m.data or b"" for m in msgs)


async def wait_until(pred: Callable[[], bool]) -> None:
    deadline = time.monotonic() + STEP_TIMEOUT
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("via_env", [True, False])
async def test_audio_reply(
    emulator_factory: Factory, tls: TestTLS, monkeypatch: pytest.MonkeyPatch, via_env: bool
) -> None:
    emu = await emulator_factory()
    if via_env:  # the SDK reads both when the Client is created
        monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", emu.base_url)
        monkeypatch.setenv("SSL_CERT_FILE", tls.ca_pem_path)
        client = genai.Client(api_key="test-key")
    else:
        client = make_client(emu, tls)
    async with client.aio.live.connect(model=MODEL, config=live_config()) as session:
        await send_pcm(session, UTTERANCE)
        msgs = await Reader(session).until(turn_complete)
    kinds = [
        k
        for m in msgs
        if m.server_content
        for k in ("input_transcription", "output_transcription", "generation_complete")
        if getattr(m.server_content, k)
    ]
    assert kinds == ["input_transcription", "output_transcription", "generation_complete"]
    assert msgs[-1].usage_metadata is not None and msgs[-1].usage_metadata.total_token_count
    audio = reply_audio(msgs)
    assert len(audio) == round(0.4 * 24000) * 2
    assert abs(dominant_freq(audio) - reply_freq(1)) < 5
    [conn] = emu.record.connections
    assert conn.setup["model"] == f"models/{MODEL}" and "sessionResumption" in conn.setup
    [turn] = emu.record.sessions[conn.session_id].turns
    assert (turn.index, turn.trigger, turn.interrupted) == (1, "audio", False)
    assert turn.finished_at is not None


async def test_goaway_then_close(emulator_factory: Factory, tls: TestTLS) -> None:
    emu = await emulator_factory(lifetime=1.0, goaway_lead=0.4)
    client = make_client(emu, tls)
    async with client.aio.live.connect(model=MODEL, config=live_config()) as session:
        reader = Reader(session)
        msgs = await reader.until(lambda m: m.go_away is not None)
        time_left = msgs[-1].go_away.time_left if msgs[-1].go_away else None
        assert time_left is not None and time_left.endswith("s")
        assert 0 < float(time_left[:-1]) <= 0.4
        with pytest.raises(errors.APIError) as caught:
            await reader.until(lambda m: False)
    assert caught.value.code == 1011
    assert emu.record.connections[0].close_kind == "goaway"
    assert format_duration(9.5) == "9.5s" and format_duration(10) == "10s"


async def test_abrupt_cut_has_no_close_frame(emulator_factory: Factory, tls: TestTLS) -> None:
    emu = await emulator_factory(abrupt_after=0.3)
    client = make_client(emu, tls)
    async with client.aio.live.connect(model=MODEL, config=live_config()) as session:
        with pytest.raises(errors.APIError) as caught:
            await Reader(session).until(lambda m: False)
        assert caught.value.code == 1006  # no close frame received
        with pytest.raises(websockets.ConnectionClosedError):
            await session.send_realtime_input(audio=types.Blob(data=b"\0\0", mime_type="audio/pcm"))
    assert emu.record.connections[0].close_kind == "abrupt"

    emu.config.abrupt_after = None  # a service restart: every open connection reset at once
    async with (
        client.aio.live.connect(model=MODEL, config=live_config()) as s1,
        client.aio.live.connect(model=MODEL, config=live_config()) as s2,
    ):
        await emu.cut_all(abrupt=False)
        for s in (s1, s2):
            reader = Reader(s)
            msgs = await reader.until(lambda m: m.go_away is not None)
            assert msgs[-1].go_away is not None and msgs[-1].go_away.time_left == "0s"
            with pytest.raises(errors.APIError) as caught:
                await reader.until(lambda m: False)
            assert caught.value.code == 1011
    assert [c.close_kind for c in emu.record.connections[1:]] == ["cut", "cut"]


async def test_resume_continues_the_session(emulator_factory: Factory, tls: TestTLS) -> None:
    emu = await emulator_factory()
    client = make_client(emu, tls)
    async with client.aio.live.connect(model=MODEL, config=live_config()) as session:
        reader = Reader(session)
        await send_pcm(session, UTTERANCE)
        await reader.until(turn_complete)
        msgs = await reader.until(new_handle)  # sent right after turnComplete
        update = msgs[-1].session_resumption_update
        assert update is not None and update.new_handle
        handle = update.new_handle
    async with client.aio.live.connect(model=MODEL, config=live_config(handle)) as session:
        await send_pcm(session, UTTERANCE)
        msgs = await Reader(session).until(turn_complete)
    assert abs(dominant_freq(reply_audio(msgs)) - reply_freq(2)) < 5
    first, second = emu.record.connections
    assert second.resumed_from == handle and second.session_id == first.session_id
    assert emu.record.handles_used == [handle]
    session_rec = emu.record.sessions[first.session_id]
    assert session_rec.connection_ids == [1, 2]
    assert [t.index for t in session_rec.turns] == [1, 2]
    assert session_rec.history_text == [
        ("user", "caller utterance 1"),
        ("model", "reply 1"),
        ("user", "caller utterance 2"),
        ("model", "reply 2"),
    ]
    # each utterance's speech, whole, on either connection (the bench's turns lost or cut)
    assert session_rec.state.utterance_speech_s == pytest.approx([0.3, 0.3])


async def test_resumed_state_is_the_handle_snapshot(
    emulator_factory: Factory, tls: TestTLS
) -> None:
    emu = await emulator_factory(handle_interval=0.05)
    client = make_client(emu, tls)
    rng = np.random.default_rng(1)
    before = rng.integers(-50, 50, 3200, dtype="<i2").tobytes()  # quiet: below the VAD
    after = rng.integers(-50, 50, 3200, dtype="<i2").tobytes()
    async with client.aio.live.connect(model=MODEL, config=live_config()) as old:
        reader = Reader(old)
        await send_pcm(old, before)
        sid = ""

        def holds_before() -> bool:
            return bool(emu.record.connections[0].audio_bytes_received == len(before))

        await wait_until(holds_before)
        received_at = time.monotonic()
        sid = emu.record.connections[0].session_id
        while True:  # a handle issued after the server held `before`
            msgs = await reader.until(new_handle)
            update = msgs[-1].session_resumption_update
            assert update is not None and update.new_handle
            if emu.record.handles_issued[update.new_handle][1] > received_at:
                handle = update.new_handle
                break
        await send_pcm(old, after)
        await wait_until(lambda: emu.record.connections[0].audio_bytes_received == 2 * len(before))
        # make before break: the old connection is still open while the new one resumes
        async with client.aio.live.connect(model=MODEL, config=live_config(handle)) as new:
            held = bytes(emu.record.sessions[sid].audio)
            assert held == before
            await send_pcm(new, silence(0.1))
            await wait_until(lambda: len(emu.record.sessions[sid].audio) > len(before))
            assert bytes(emu.record.sessions[sid].audio) == before + silence(0.1)
            assert len(emu.open_connections()) == 2


async def test_concurrent_resume_can_be_rejected(emulator_factory: Factory, tls: TestTLS) -> None:
    emu = await emulator_factory(handle_interval=0.05, concurrent_resume="refuse")
    client = make_client(emu, tls)
    async with client.aio.live.connect(model=MODEL, config=live_config()) as old:
        msgs = await Reader(old).until(new_handle)
        update = msgs[-1].session_resumption_update
        assert update is not None and update.new_handle
        with pytest.raises(errors.APIError) as caught:
            async with client.aio.live.connect(model=MODEL, config=live_config(update.new_handle)):
                pass
        assert caught.value.code == 1011
    async with client.aio.live.connect(model=MODEL, config=live_config(update.new_handle)):
        pass  # break before make works
    assert [c.resumed_from for c in emu.record.connections] == [None, None, update.new_handle]


async def test_unknown_or_expired_handle_is_refused(
    emulator_factory: Factory, tls: TestTLS
) -> None:
    emu = await emulator_factory(handle_interval=0.05, handle_ttl=0.2)
    client = make_client(emu, tls)
    with pytest.raises(errors.APIError) as caught:
        async with client.aio.live.connect(model=MODEL, config=live_config("no-such-handle")):
            pass
    assert caught.value.code == 1008
    assert emu.record.connections[0].setup["sessionResumption"] == {"handle": "no-such-handle"}
    async with client.aio.live.connect(model=MODEL, config=live_config()) as session:
        msgs = await Reader(session).until(new_handle)
    update = msgs[-1].session_resumption_update
    assert update is not None and update.new_handle
    await asyncio.sleep(0.3)
    with pytest.raises(errors.APIError) as caught:
        async with client.aio.live.connect(model=MODEL, config=live_config(update.new_handle)):
            pass
    assert caught.value.code == 1008
    assert [c.close_kind for c in emu.record.connections] == ["bad_handle", "client", "bad_handle"]


async def test_session_limit_only_without_compression(
    emulator_factory: Factory, tls: TestTLS
) -> None:
    emu = await emulator_factory(session_limit=1.0, handle_interval=0.1)
    client = make_client(emu, tls)
    async with (
        client.aio.live.connect(model=MODEL, config=live_config()) as plain,
        client.aio.live.connect(model=MODEL, config=live_config(compression=True)) as packed,
    ):
        reader = Reader(plain)
        msgs = await reader.until(new_handle)
        update = msgs[-1].session_resumption_update
        assert update is not None and update.new_handle
        with pytest.raises(errors.APIError) as caught:
            await reader.until(lambda m: False)
        assert caught.value.code == 1011
        await asyncio.sleep(0.5)  # well past the limit: the compressed session still runs
        await send_pcm(packed, UTTERANCE)
        msgs = await Reader(packed).until(turn_complete)
        assert abs(dominant_freq(reply_audio(msgs)) - reply_freq(1)) < 5
    with pytest.raises(errors.APIError) as caught:  # the ended session's handles are dead
        async with client.aio.live.connect(model=MODEL, config=live_config(update.new_handle)):
            pass
    assert caught.value.code == 1008
    kinds = [c.close_kind for c in emu.record.connections]
    assert kinds == ["session_limit", "client", "bad_handle"]


async def test_speech_during_reply_interrupts(emulator_factory: Factory, tls: TestTLS) -> None:
    emu = await emulator_factory(reply_s=3.0)
    client = make_client(emu, tls)
    async with client.aio.live.connect(model=MODEL, config=live_config()) as session:
        reader = Reader(session)
        await send_pcm(session, UTTERANCE)
        await reader.until(lambda m: m.data is not None)
        emu.config.reply_s = 0.4  # knobs are read per use: the next reply is short
        await send_pcm(session, UTTERANCE)  # barge in
        msgs = await reader.until(lambda m: bool(m.server_content and m.server_content.interrupted))
        assert not any(turn_complete(m) for m in msgs)
        assert sum(len(m.data or b"") for m in msgs) < 3.0 * 24000 * 2
        msgs = await reader.until(turn_complete)
    assert abs(dominant_freq(reply_audio(msgs)) - reply_freq(2)) < 5
    turns = emu.record.sessions[emu.record.connections[0].session_id].turns
    assert [(t.index, t.interrupted) for t in turns] == [(1, True), (2, False)]


async def test_text_turns_and_history(emulator_factory: Factory, tls: TestTLS) -> None:
    emu = await emulator_factory()
    client = make_client(emu, tls)
    history: list[types.Content | types.ContentDict] = [
        types.Content(role="user", parts=[types.Part(text="hello")]),
        types.Content(role="model", parts=[types.Part(text="hi there")]),
        types.Content(role="user", parts=[types.Part(text="and?")]),
        types.Content(role="model", parts=[types.Part(text="and so on")]),
    ]
    async with client.aio.live.connect(model=MODEL, config=live_config()) as session:
        await session.send_client_content(turns=history, turn_complete=False)
        await session.send_client_content(
            turns=types.Content(role="user", parts=[types.Part(text="Greet the caller.")])
        )
        msgs = await Reader(session).until(turn_complete)
    assert abs(dominant_freq(reply_audio(msgs)) - reply_freq(3)) < 5
    state = emu.record.sessions[emu.record.connections[0].session_id]
    assert state.history_text[1] == ("model", "hi there")
    assert state.history_text[-2:] == [("user", "Greet the caller."), ("model", "reply 3")]
    assert [(t.index, t.trigger) for t in state.turns] == [(3, "text")]


async def test_refusals(emulator_factory: Factory, tls: TestTLS) -> None:
    emu = await emulator_factory()
    client = make_client(emu, tls)
    emu.refuse_connections(time.monotonic() + 60)
    with pytest.raises(errors.APIError) as caught:
        async with client.aio.live.connect(model=MODEL, config=live_config()):
            pass
    assert caught.value.code == 1011
    emu.config.refuse_with_http = True
    with pytest.raises(websockets.InvalidStatus) as http_refusal:
        async with client.aio.live.connect(model=MODEL, config=live_config()):
            pass
    assert http_refusal.value.response.status_code == 503
    emu.refuse_connections(None)
    with pytest.raises(errors.APIError) as caught:
        async with make_client(emu, tls, api_key="wrong").aio.live.connect(model=MODEL):
            pass
    assert caught.value.code == 1007
    async with client.aio.live.connect(model=MODEL, config=live_config()):
        pass
    assert [c.refused for c in emu.record.connections] == [True, True, False, False]
    assert [c.close_kind for c in emu.record.connections] == [
        "refused",
        "refused",
        "refused",
        "client",
    ]


@pytest.mark.parametrize(
    ("headers", "messages", "code"),
    [
        ({}, ['{"setup": {"model": "models/x"}}'], 1008),
        ({"x-goog-api-key": "test-key"}, ["not json"], 1007),
        ({"x-goog-api-key": "test-key"}, ['{"realtime_input": {"text": "hi"}}'], 1008),
        (
            {"x-goog-api-key": "test-key"},
            ['{"setup": {"model": "models/gemini-3.8-live"}}', '{"bogus": {}}'],
            1007,
        ),
        (
            {"x-goog-api-key": "test-key"},
            [
                '{"setup": {"model": "models/gemini-3.8-live"}}',
                '{"realtimeInput": {"audio": {"data": "!!!", "mimeType": "audio/pcm"}}}',
            ],
            1007,
        ),
        # a retired model: refused at its setup
        ({"x-goog-api-key": "test-key"}, ['{"setup": {"model": "models/x"}}'], 1008),
    ],
)
async def test_bad_input_is_closed_with_a_code(
    emulator_factory: Factory,
    tls: TestTLS,
    caplog: pytest.LogCaptureFixture,
    headers: dict[str, str],
    messages: list[str],
    code: int,
) -> None:
    emu = await emulator_factory()
    url = emu.base_url.replace("https", "wss") + PATH
    caplog.set_level(logging.WARNING)
    async with ws_connect(url, ssl=tls.client_ssl, additional_headers=headers) as ws:
        for text in messages:
            await ws.send(text)
        with pytest.raises(websockets.ConnectionClosedError) as caught:
            while True:
                await ws.recv()
    assert caught.value.rcvd is not None and caught.value.rcvd.code == code
    assert caught.value.rcvd.reason
    assert emu.record.connections[0].close_code == code
    assert not [r for r in caplog.records if r.name.startswith("gateway")]


async def test_stop_closes_everything_and_leaks_no_task(tls: TestTLS) -> None:
    emu = LiveEmulator(EmulatorConfig(handle_interval=0.05), tls)
    await emu.start()
    client = make_client(emu, tls)
    async with contextlib.AsyncExitStack() as stack:
        sessions = [
            await stack.enter_async_context(
                client.aio.live.connect(model=MODEL, config=live_config())
            )
            for _ in range(3)
        ]
        await send_pcm(sessions[0], UTTERANCE)
        await asyncio.sleep(0.2)
        await emu.stop()
        for s in sessions:
            with pytest.raises(errors.APIError) as caught:
                await Reader(s).until(lambda m: False)
            assert caught.value.code == 1001
    leftovers = [
        t
        for t in asyncio.all_tasks()
        if t is not asyncio.current_task() and "live_emulator" in repr(t.get_coro())
    ]
    assert leftovers == []
    assert all(c.closed_at is not None for c in emu.record.connections)


# --- behaviour knobs (see the emulator's module docstring for what each default rests on) ----


def quiet(seconds: float, seed: int) -> bytes:
    """Noise below the VAD: the session holds it, it is never an utterance."""
    rng = np.random.default_rng(seed)
    return rng.integers(-50, 50, int(16000 * seconds), dtype="<i2").tobytes()


async def next_handle(reader: Reader) -> str:
    msgs = await reader.until(new_handle)
    update = msgs[-1].session_resumption_update
    assert update is not None and update.new_handle
    return update.new_handle


def chunks(pcm: bytes) -> int:
    """Messages send_pcm writes for ``pcm``."""
    return -(-len(pcm) // 640)


async def test_setup_latency_is_drawn_per_connection(
    emulator_factory: Factory, tls: TestTLS
) -> None:
    assert EmulatorConfig().setup_latency == (0.2, 0.6)  # the default: hundreds of ms
    emu = await emulator_factory(setup_latency=(0.1, 0.3), seed=3)
    client = make_client(emu, tls)
    for _ in range(4):
        async with client.aio.live.connect(model=MODEL, config=live_config()):
            pass
    latencies = [c.setup_latency for c in emu.record.connections]
    assert all(0.1 <= x <= 0.3 for x in latencies) and len(set(latencies)) == 4
    for c in emu.record.connections:
        assert c.setup_completed_at is not None
        assert c.setup_completed_at - c.opened_at >= c.setup_latency


@pytest.mark.parametrize(("code", "seen"), [(None, 1006), (1011, 1011), (1007, 1007)])
async def test_cut_during_a_setup(
    emulator_factory: Factory, tls: TestTLS, code: int | None, seen: int
) -> None:
    emu = await emulator_factory(setup_latency=(5.0, 5.0))
    client = make_client(emu, tls)

    async def connect() -> None:
        async with client.aio.live.connect(model=MODEL, config=live_config()):
            pass

    task = asyncio.create_task(connect())
    await wait_until(lambda: bool(emu.record.connections and emu.record.connections[0].setup))
    [cid] = emu.in_setup()
    await emu.cut(cid, code=code)
    with pytest.raises(errors.APIError) as caught:
        await task
    assert caught.value.code == seen
    [conn] = emu.record.connections
    assert conn.setup_completed_at is None and conn.close_code == seen
    assert emu.record.sessions == {}


async def test_refuse_next_connections(emulator_factory: Factory, tls: TestTLS) -> None:
    emu = await emulator_factory()
    client = make_client(emu, tls)
    emu.refuse_next(2, how="http")
    emu.refuse_next(1, how=1011)
    emu.refuse_next(1, how="reset")
    for _ in range(2):
        with pytest.raises(websockets.InvalidStatus) as http_refusal:
            async with client.aio.live.connect(model=MODEL, config=live_config()):
                pass
        assert http_refusal.value.response.status_code == 503
    for code in (1011, 1006):
        with pytest.raises(errors.APIError) as caught:
            async with client.aio.live.connect(model=MODEL, config=live_config()):
                pass
        assert caught.value.code == code
    async with client.aio.live.connect(model=MODEL, config=live_config()):
        pass  # the fifth is accepted
    assert [c.refused for c in emu.record.connections] == [True] * 4 + [False]
    assert [c.close_code for c in emu.record.connections] == [503, 503, 1011, 1006, None]


@pytest.mark.parametrize("code", [1000, 1007, 1008, 1011])
async def test_cut_with_a_close_code(emulator_factory: Factory, tls: TestTLS, code: int) -> None:
    emu = await emulator_factory()
    client = make_client(emu, tls)
    async with client.aio.live.connect(model=MODEL, config=live_config()) as session:
        [cid] = emu.open_connections()
        await emu.cut(cid, code=code)
        with pytest.raises(errors.APIError) as caught:
            await Reader(session).until(lambda m: False)
    assert caught.value.code == code and CLOSE_REASONS[code] in str(caught.value)
    assert (emu.record.connections[0].close_kind, emu.record.connections[0].close_code) == (
        "cut",
        code,
    )
    # The same from the connection's own timer: abrupt_after with a close code.
    emu.config.abrupt_after, emu.config.abrupt_kinds = 0.1, (code,)
    async with client.aio.live.connect(model=MODEL, config=live_config()) as session:
        with pytest.raises(errors.APIError) as caught:
            await Reader(session).until(lambda m: False)
    assert caught.value.code == code
    assert emu.record.connections[1].close_kind == "abrupt"


@pytest.mark.parametrize(("code", "reason"), [(1011, REASON_DEADLINE), (1000, REASON_CANCELLED)])
async def test_goaway_lead_longer_than_what_is_left(
    emulator_factory: Factory, tls: TestTLS, code: int, reason: str
) -> None:
    """A lead of 50 s on a connection with less than that left (here less than one setup):
    the goAway comes at once, announcing what is left; then the close with its code."""
    assert EmulatorConfig().goaway_lead == 50.0
    emu = await emulator_factory(
        lifetime=0.5, goaway_lead=50.0, goaway_close_code=code, setup_latency=(0.2, 0.2)
    )
    client = make_client(emu, tls)
    async with client.aio.live.connect(model=MODEL, config=live_config()) as session:
        reader = Reader(session)
        msgs = await reader.until(lambda m: m.go_away is not None)
        assert msgs[-1].go_away is not None and msgs[-1].go_away.time_left is not None
        assert 0 <= float(msgs[-1].go_away.time_left[:-1]) <= 0.3
        with pytest.raises(errors.APIError) as caught:
            await reader.until(lambda m: False)
    assert caught.value.code == code and reason in str(caught.value)
    assert emu.record.connections[0].close_kind == "goaway"


async def test_go_away_now(emulator_factory: Factory, tls: TestTLS) -> None:
    emu = await emulator_factory()
    client = make_client(emu, tls)
    async with client.aio.live.connect(model=MODEL, config=live_config()) as session:
        [cid] = emu.open_connections()
        assert emu.go_away(cid, 0.3, code=1000)
        reader = Reader(session)
        msgs = await reader.until(lambda m: m.go_away is not None)
        assert msgs[-1].go_away is not None and msgs[-1].go_away.time_left == "0.3s"
        with pytest.raises(errors.APIError) as caught:
            await reader.until(lambda m: False)
    assert caught.value.code == 1000
    assert not emu.go_away(cid, 1.0)  # no longer open


async def test_takeover_moves_the_session_to_the_newer_connection(
    emulator_factory: Factory, tls: TestTLS
) -> None:
    emu = await emulator_factory(concurrent_resume="takeover", handle_interval=0.05, reply_s=3.0)
    client = make_client(emu, tls)
    ignored, kept = quiet(0.2, 1), quiet(0.2, 2)
    async with client.aio.live.connect(model=MODEL, config=live_config()) as old:
        old_reader = Reader(old)
        handle = await next_handle(old_reader)
        sid = emu.record.connections[0].session_id
        await send_pcm(old, UTTERANCE)
        await old_reader.until(lambda m: m.data is not None)  # its reply has begun
        async with client.aio.live.connect(model=MODEL, config=live_config(handle)) as new:
            old_rec, new_rec = emu.record.connections
            assert old_rec.superseded_by == new_rec.id
            # The older connection's reply stopped, without a turnComplete; its next
            # handle describes the newer connection's state, which is not generating.
            msgs = await old_reader.until(new_handle)
            assert not any(turn_complete(m) for m in msgs)
            assert [e[2] for e in emu.record.events if e[1] == "reply_cut"] == ["conn=1 n=1"]
            await send_pcm(old, ignored)  # dropped: the session is elsewhere
            await wait_until(lambda: old_rec.dropped_audio_bytes == len(ignored))
            await send_pcm(new, kept)
            await wait_until(lambda: new_rec.audio_bytes_received == len(kept))
            processed_at = time.monotonic()
            while True:
                later = await next_handle(old_reader)
                if emu.record.handles_issued[later][1] > processed_at:
                    break
        assert old_rec.dropped_messages == chunks(ignored)
        assert bytes(emu.record.sessions[sid].audio) == kept
        async with client.aio.live.connect(model=MODEL, config=live_config(later)):
            # resumed from the older connection's handle: the newer one's lineage
            assert bytes(emu.record.sessions[sid].audio) == kept
    assert emu.record.sessions[sid].connection_ids == [1, 2, 3]


async def test_handle_cadence_is_jittered(emulator_factory: Factory, tls: TestTLS) -> None:
    assert EmulatorConfig(handle_interval=(0.2, 5.0)).handle_interval == (0.2, 5.0)
    emu = await emulator_factory(handle_interval=(0.05, 0.2), seed=5)
    client = make_client(emu, tls)
    async with client.aio.live.connect(model=MODEL, config=live_config()) as session:
        reader = Reader(session)
        handles = [await next_handle(reader) for _ in range(8)]
    times = [emu.record.handles_issued[h][1] for h in handles]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g >= 0.05 for g in gaps), gaps
    assert len({round(g, 3) for g in gaps}) > 1, gaps  # not one fixed interval


async def test_no_handle_between_a_tool_call_and_its_response(
    emulator_factory: Factory, tls: TestTLS
) -> None:
    emu = await emulator_factory(
        handle_interval=0.05, tool_call_on_text={"weather": ("get_weather", {"city": "Oslo"})}
    )
    client = make_client(emu, tls)
    async with client.aio.live.connect(model=MODEL, config=live_config()) as session:
        reader = Reader(session)
        await session.send_client_content(
            turns=types.Content(role="user", parts=[types.Part(text="the weather?")])
        )
        msgs = await reader.until(lambda m: m.tool_call is not None)
        assert msgs[-1].tool_call is not None and msgs[-1].tool_call.function_calls
        call = msgs[-1].tool_call.function_calls[0]
        await reader.until(turn_complete)
        updates: list[types.LiveServerSessionResumptionUpdate] = []
        while len(updates) < 4:  # the reply is over, the call is not answered yet
            msg = await reader.next()
            if msg.session_resumption_update is not None:
                updates.append(msg.session_resumption_update)
        assert all(not u.resumable and not u.new_handle for u in updates), updates
        await session.send_tool_response(
            function_responses=[
                types.FunctionResponse(id=call.id, name=call.name, response={"temp": 3})
            ]
        )
        await next_handle(reader)


async def test_input_in_flight_is_not_in_a_handle(emulator_factory: Factory, tls: TestTLS) -> None:
    delay = 1.0
    emu = await emulator_factory(input_delay=delay, handle_interval=0.05)
    client = make_client(emu, tls)
    audio = quiet(0.1, 3)
    async with client.aio.live.connect(model=MODEL, config=live_config()) as session:
        reader = Reader(session)
        await next_handle(reader)
        sent_at = time.monotonic()
        await send_pcm(session, audio)
        rec = emu.record.connections[0]
        sid = rec.session_id
        await wait_until(lambda: rec.messages_received == chunks(audio))
        # A handle issued less than the delay after the audio was sent cannot hold it.
        early = ""
        while not early:
            handle = await next_handle(reader)
            issued = emu.record.handles_issued[handle][1]
            assert issued < sent_at + delay, "no handle while the audio was in flight"
            early = handle if issued > sent_at else ""
        await wait_until(lambda: rec.audio_bytes_received == len(audio))
        processed_at = time.monotonic()
        while True:
            late = await next_handle(reader)
            if emu.record.handles_issued[late][1] > processed_at:
                break
        async with client.aio.live.connect(model=MODEL, config=live_config(early)):
            assert bytes(emu.record.sessions[sid].audio) == b""
        async with client.aio.live.connect(model=MODEL, config=live_config(late)):
            assert bytes(emu.record.sessions[sid].audio) == audio


async def test_input_in_flight_at_a_close(emulator_factory: Factory, tls: TestTLS) -> None:
    """The client's close follows its input: that still arrives. A cut by the service loses
    what was still in flight, and the record says how much."""
    emu = await emulator_factory(input_delay=1.0)
    client = make_client(emu, tls)
    audio = quiet(0.1, 4)
    async with client.aio.live.connect(model=MODEL, config=live_config()) as session:
        await send_pcm(session, audio)
        first = emu.record.connections[0]
        await wait_until(lambda: first.messages_received == chunks(audio))
    await wait_until(lambda: first.closed_at is not None)
    assert bytes(emu.record.sessions[first.session_id].audio) == audio
    assert first.in_flight_lost_bytes == 0
    async with client.aio.live.connect(model=MODEL, config=live_config()) as session:
        await send_pcm(session, audio)
        second = emu.record.connections[1]
        await wait_until(lambda: second.messages_received == chunks(audio))
        await emu.cut(second.id)
    await wait_until(lambda: second.closed_at is not None)
    assert bytes(emu.record.sessions[second.session_id].audio) == b""
    assert second.in_flight_lost_bytes == len(audio)


@pytest.mark.parametrize(
    ("input_delay", "pong_delay", "least"), [(0.3, (0.0, 0.0), 0.3), (0.0, (0.4, 0.6), 0.4)]
)
async def test_pings_are_answered_after_the_delay(
    emulator_factory: Factory,
    tls: TestTLS,
    input_delay: float,
    pong_delay: tuple[float, float],
    least: float,
) -> None:
    emu = await emulator_factory(input_delay=input_delay, pong_delay=pong_delay)
    url = emu.base_url.replace("https", "wss") + PATH
    headers = {"x-goog-api-key": "test-key"}
    async with ws_connect(url, ssl=tls.client_ssl, additional_headers=headers) as ws:
        await ws.send(json.dumps({"setup": {"model": f"models/{MODEL}"}}))
        assert "setupComplete" in json.loads(await ws.recv())
        waiters = [await ws.ping(f"p{i}") for i in range(3)]
        latencies = [await w for w in waiters]
    assert all(rtt >= least for rtt in latencies), latencies


@pytest.mark.parametrize("mode", ["repeat", "wait"])
async def test_after_a_reply_was_cut_off(
    emulator_factory: Factory, tls: TestTLS, mode: str
) -> None:
    """Resumed from a handle issued before a reply that was then cut off, with the caller's
    audio since the handle replayed: the model says the reply again, or holds the utterance
    as answered and waits for new input."""
    emu = await emulator_factory(after_cut_reply=mode, handle_interval=0.05, reply_s=3.0)
    client = make_client(emu, tls)
    async with client.aio.live.connect(model=MODEL, config=live_config()) as old:
        reader = Reader(old)
        handle = await next_handle(reader)
        sid = emu.record.connections[0].session_id
        await send_pcm(old, UTTERANCE)
        await reader.until(lambda m: m.data is not None)  # the reply has begun ...
        await emu.cut(emu.record.connections[0].id)  # ... and is cut off
        with pytest.raises(errors.APIError):
            await reader.until(lambda m: False)
    emu.config.reply_s = 0.4
    async with client.aio.live.connect(model=MODEL, config=live_config(handle)) as new:
        reader = Reader(new)
        await send_pcm(new, UTTERANCE)  # replayed
        session = emu.record.sessions[sid]
        if mode == "wait":
            await wait_until(lambda: session.withheld == [1])
            await new.send_client_content(
                turns=types.Content(role="user", parts=[types.Part(text="Go on.")])
            )
        msgs = await reader.until(turn_complete)
    audio = reply_audio(msgs)
    assert len(audio) == round(0.4 * 24000) * 2  # one reply, said once
    assert abs(dominant_freq(audio) - reply_freq(1)) < 5
    expected = ["audio"] if mode == "repeat" else ["text"]
    assert [t.trigger for t in session.turns] == expected
    assert session.withheld == ([] if mode == "repeat" else [1])


@pytest.mark.parametrize("compress", [False, True])
async def test_permessage_deflate_knob(
    emulator_factory: Factory, tls: TestTLS, compress: bool
) -> None:
    """The SDK's websockets client offers permessage-deflate; the emulator takes it or not."""
    emu = await emulator_factory(compress=compress)
    client = make_client(emu, tls)
    async with client.aio.live.connect(model=MODEL, config=live_config()) as session:
        await send_pcm(session, UTTERANCE)
        msgs = await Reader(session).until(turn_complete)
    assert abs(dominant_freq(reply_audio(msgs)) - reply_freq(1)) < 5
    assert emu.record.connections[0].compressed is compress


async def keep_connected(client: genai.Client, stop: asyncio.Event) -> None:
    """A client that talks on, keeps the newest handle and resumes whenever it is cut."""
    handle: str | None = None
    while not stop.is_set():
        try:
            async with client.aio.live.connect(model=MODEL, config=live_config(handle)) as s:
                reader = Reader(s)
                await send_pcm(s, UTTERANCE)
                while not stop.is_set():
                    msg = await reader.next()
                    update = msg.session_resumption_update
                    if update is not None and update.resumable and update.new_handle:
                        handle = update.new_handle
                    if turn_complete(msg):
                        await send_pcm(s, UTTERANCE)  # and talks on
        except (errors.APIError, websockets.WebSocketException, TimeoutError, OSError):
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("kind", KINDS)
async def test_chaos_does_what_it_says(emulator_factory: Factory, tls: TestTLS, kind: str) -> None:
    emu = await emulator_factory(handle_interval=0.05, setup_latency=(0.3, 0.3), reply_s=2.0)
    monkey = Chaos(emu, ChaosConfig(seed=1))
    stop = asyncio.Event()
    client_task = asyncio.create_task(keep_connected(make_client(emu, tls), stop))
    try:
        await wait_until(lambda: any(c.handles_issued for c in emu.record.connections))
        assert await monkey.disrupt(kind)
        done = monkey.done[0] if kind == "twice" else monkey.done[-1]
        assert done.kind == kind and done.session_id == emu.record.connections[0].session_id
        hit = next(c for c in emu.record.connections if c.id == done.connection_id)
        await wait_until(lambda: hit.closed_at is not None)
        if kind == "goaway":
            assert hit.close_kind == "goaway" and hit.close_code in (1000, 1011)
        elif kind.startswith("close-"):
            assert hit.close_code == int(kind.removeprefix("close-"))
        else:
            assert hit.close_code == 1006
        if kind == "during-setup":
            assert hit.setup_completed_at is None
        if kind == "refuse-http":
            await wait_until(lambda: any(c.close_code == 503 for c in emu.record.connections))
        if kind == "twice":
            first, second = monkey.done
            assert second.connection_id > first.connection_id
            assert second.session_id == first.session_id
    finally:
        stop.set()
        for cid in emu.open_connections():
            await emu.cut(cid)
        await asyncio.wait_for(client_task, STEP_TIMEOUT)


def test_tls_material(tmp_path: Path) -> None:
    material = make_tls(tmp_path / "x")
    assert Path(material.ca_pem_path).read_text().startswith("-----BEGIN CERTIFICATE-----")
