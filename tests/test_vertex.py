"""Vertex AI as the Live backend: the real google-genai SDK and google-auth against the
emulator's Vertex path over TLS, with the real OAuth exchange for a service account."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from google import genai
from google.auth.exceptions import RefreshError
from google.genai import errors, types
from google.oauth2.credentials import Credentials as TokenCredentials
from survival_helpers import SPEED, run_call

from gateway.backend import Backend, region_problem, resolve
from gateway.config import ConfigError, Settings, load_settings
from gateway.live import sdk
from gateway.live.events import Resumed
from gateway.live.handles import IndexPlacement, Placement, RoundTripPlacement
from gateway.live.machine import Emit, LossKind, Open, SessionMachine, Write
from gateway.live.settings import LiveSettings
from gateway.testing.analysis import await_reply, heard_replies
from gateway.testing.explorer import Concurrency, explore
from gateway.testing.harness import PUBLIC_URL, BackendKind, quick_emulator, test_bed
from gateway.testing.live_emulator import (
    REASON_CANCELLED,
    REASON_MODEL_NOT_FOUND,
    EmulatorConfig,
    LiveEmulator,
)
from gateway.testing.service_account import service_account_file
from gateway.testing.tls import TestTLS, make_tls

V25 = "gemini-live-2.5-flash-native-audio"
V38 = "gemini-3.8-live"
PROJECT = "vertex-test"
STEP_S = 5.0

pytestmark = pytest.mark.usefixtures("no_config_file", "no_backend_environment")


@pytest.fixture
def no_backend_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the backend settings a test gives (none from the developer's environment)."""
    for name in (
        "GEMINI_API_KEY",
        "GOOGLE_API_KEY",
        "GOOGLE_GENAI_USE_VERTEXAI",
        "GOOGLE_GENAI_USE_ENTERPRISE",
        "GOOGLE_CLOUD_PROJECT",
        "GOOGLE_CLOUD_LOCATION",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "GOOGLE_GEMINI_BASE_URL",
        "GOOGLE_VERTEX_BASE_URL",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TestTLS:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture
async def emu(tls: TestTLS) -> AsyncIterator[LiveEmulator]:
    config = EmulatorConfig(
        setup_latency=(0.0, 0.0), handle_interval=0.2, reply_s=0.3, response_delay_s=0.05
    )
    emulator = LiveEmulator(config, tls)
    await emulator.start()
    yield emulator
    await emulator.stop()


@pytest.fixture
def vertex_env(
    emu: LiveEmulator, tls: TestTLS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """The environment an operator sets for Vertex AI, pointed at the emulator: the base
    URL, its CA (the socket reads SSL_CERT_FILE, google-auth's token request
    REQUESTS_CA_BUNDLE) and a service-account key file whose token_uri is the emulator's."""
    account = service_account_file(tmp_path, emu, PROJECT)
    monkeypatch.setenv("GOOGLE_VERTEX_BASE_URL", emu.base_url)
    monkeypatch.setenv("SSL_CERT_FILE", tls.ca_pem_path)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", tls.ca_pem_path)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(account))
    return account


def key_file(path: Path, **changes: str) -> dict[str, str]:
    """A service-account key file's fields (rewritten with `changes`, if any)."""
    info: dict[str, str] = {**json.loads(path.read_text()), **changes}
    if changes:
        path.write_text(json.dumps(info))
    return info


def settings(**values: Any) -> Settings:
    return load_settings(public_url=PUBLIC_URL, twilio_auth_token="t", **values)


def vertex_settings(location: str = "us-central1", **values: Any) -> Settings:
    return settings(vertexai=True, google_cloud_location=location, **values)


def live_config(transparent: bool = True, handle: str | None = None) -> types.LiveConnectConfig:
    return types.LiveConnectConfig(
        response_modalities=[types.Modality.AUDIO],
        session_resumption=types.SessionResumptionConfig(
            handle=handle, transparent=transparent or None
        ),
        output_audio_transcription=types.AudioTranscriptionConfig(),
    )


def tone(seconds: float, amp: float = 0.3) -> bytes:
    import numpy as np

    t = np.arange(int(16000 * seconds)) / 16000
    return (amp * 32767 * np.sin(2 * np.pi * 300 * t)).astype("<i2").tobytes()


async def speak(session: Any, pcm: bytes, piece: int = 1280) -> int:
    """Write `pcm` as the gateway does (its direct socket path); how many messages."""
    count = 0
    for i in range(0, len(pcm), piece):
        await sdk.write_audio(session, pcm[i : i + piece])
        count += 1
    return count


async def until(
    stream: AsyncIterator[Any], pred: Callable[[Any], bool], seen: list[Any] | None = None
) -> Any:
    async with asyncio.timeout(STEP_S):
        async for message in stream:
            if seen is not None:
                seen.append(message)
            if pred(message):
                return message
    raise AssertionError("the stream ended")


def indexed_handle(message: Any) -> bool:
    update = getattr(message, "session_resumption_update", None)
    return bool(update and update.new_handle and update.last_consumed_client_message_index)


# ------------------------------------------------------------------------ settings, start


def test_the_gemini_api_needs_a_key_and_vertex_does_not() -> None:
    with pytest.raises(ConfigError) as caught:
        settings()
    assert str(caught.value) == "missing setting GEMINI_API_KEY or GOOGLE_API_KEY"
    made = vertex_settings()
    assert made.vertexai and made.gemini_api_key is None


def test_the_backend_is_read_from_the_sdks_own_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GOOGLE_GENAI_USE_VERTEXAI", "true")
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "p1")
    monkeypatch.setenv("GOOGLE_CLOUD_LOCATION", "europe-west4")
    made = settings()
    assert (made.vertexai, made.google_cloud_project, made.google_cloud_location) == (
        True,
        "p1",
        "europe-west4",
    )
    # The SDK's newer variable wins over the older one, as the SDK has it.
    monkeypatch.setenv("GOOGLE_GENAI_USE_ENTERPRISE", "false")
    monkeypatch.setenv("GEMINI_API_KEY", "k")
    assert settings().vertexai is False
    monkeypatch.setenv("GOOGLE_GENAI_USE_ENTERPRISE", "perhaps")
    with pytest.raises(ConfigError) as caught:
        settings()
    assert str(caught.value).startswith("invalid setting GOOGLE_GENAI_USE_ENTERPRISE: ")


def test_a_2_5_model_in_global_stops_the_start_with_one_line() -> None:
    with pytest.raises(ConfigError) as caught:
        resolve(vertex_settings(location=""), (V25,))
    text = str(caught.value)
    assert text.startswith("invalid setting GOOGLE_CLOUD_LOCATION: ") and "\n" not in text
    assert region_problem(f"publishers/google/models/{V25}", "us-central1") is None
    assert region_problem(V38, "global") is None


def test_vertex_without_credentials_stops_the_start_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "absent.json"))
    with pytest.raises(ConfigError) as caught:
        resolve(vertex_settings(google_cloud_project=PROJECT), (V38,))
    text = str(caught.value)
    assert text.startswith("Vertex AI: no Application Default Credentials") and "\n" not in text


def test_express_mode_is_a_key_without_a_project() -> None:
    backend = resolve(vertex_settings(gemini_api_key="vk"), (V38,))
    assert backend == Backend(vertex=True, api_key="vk", location="us-central1")
    assert backend.describe().startswith("Vertex AI express mode")
    assert "vk" not in backend.describe()


# -------------------------------------------------------------- the SDK on the Vertex path


async def test_a_service_account_gets_a_token_and_a_session(
    emu: LiveEmulator, vertex_env: Path
) -> None:
    backend = resolve(vertex_settings(), (V25,))
    assert backend.project == PROJECT  # from the key file
    client = backend.client(types.HttpOptions())
    assert client.vertexai
    async with client.aio.live.connect(model=V25, config=live_config()) as session:
        await speak(session, tone(0.3) + bytes(32000))
        seen: list[Any] = []
        await until(sdk.receive(session), lambda m: getattr(m, "usage_metadata", None), seen)
    account = key_file(vertex_env)["client_email"]
    assert emu.vertex.exchanges == [account]  # google-auth's assertion, verified
    [conn] = emu.record.connections
    model = f"projects/{PROJECT}/locations/us-central1/publishers/google/models/{V25}"
    assert conn.setup["model"] == model
    assert conn.setup["sessionResumption"] == {"transparent": True}
    assert any(kind == "open" and "version=v1beta1" in text for _, kind, text in emu.record.events)
    # The fast path on Vertex: audio-only messages come as PCM, the rest through the SDK's
    # Vertex converter (usage in Vertex's words: candidatesTokenCount).
    assert any(isinstance(m, list) and m for m in seen)
    usage = seen[-1].usage_metadata
    assert usage.response_token_count == round(emu.config.reply_s * 25)


async def test_a_forged_assertion_is_refused(
    emu: LiveEmulator, vertex_env: Path, tmp_path: Path
) -> None:
    impostor = LiveEmulator(EmulatorConfig(), None)  # registers the key nowhere we look
    other = key_file(service_account_file(tmp_path / "x", impostor, PROJECT))
    key_file(vertex_env, private_key=other["private_key"])  # same account, another key
    client = resolve(vertex_settings(), (V38,)).client(types.HttpOptions())
    with pytest.raises(RefreshError, match="Invalid JWT Signature"):
        async with client.aio.live.connect(model=V38, config=live_config()):
            pass
    assert emu.vertex.exchanges == [] and emu.record.connections == []


async def test_a_token_the_emulator_did_not_issue_is_closed_1008(
    emu: LiveEmulator, vertex_env: Path
) -> None:
    client = genai.Client(
        vertexai=True,
        project=PROJECT,
        location="us-central1",
        credentials=TokenCredentials(token="ya29.forged"),  # type: ignore[no-untyped-call]
        http_options=types.HttpOptions(base_url=emu.base_url),
    )
    with pytest.raises(errors.APIError) as caught:
        async with client.aio.live.connect(model=V38, config=live_config()):
            pass
    assert caught.value.code == 1008


async def test_a_model_not_served_in_the_location_is_closed_1008(
    emu: LiveEmulator, vertex_env: Path
) -> None:
    backend = resolve(vertex_settings(), (V38,))
    client = genai.Client(
        vertexai=True,
        project=PROJECT,
        location="global",
        credentials=backend.credentials,
        http_options=types.HttpOptions(base_url=emu.base_url),
    )
    with pytest.raises(errors.APIError) as caught:
        async with client.aio.live.connect(model=V25, config=live_config()):
            pass
    assert caught.value.code == 1008 and REASON_MODEL_NOT_FOUND in str(caught.value)
    async with client.aio.live.connect(model=V38, config=live_config()):
        pass  # served in global


async def test_express_mode_key_on_the_vertex_path(
    emu: LiveEmulator, tls: TestTLS, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOOGLE_VERTEX_BASE_URL", emu.base_url)
    monkeypatch.setenv("SSL_CERT_FILE", tls.ca_pem_path)
    good = resolve(vertex_settings(gemini_api_key=emu.config.vertex_api_key), (V38,))
    async with good.client(types.HttpOptions()).aio.live.connect(
        model=V38, config=live_config()
    ) as session:
        await speak(session, tone(0.3) + bytes(32000))
        await until(sdk.receive(session), lambda m: getattr(m, "usage_metadata", None))
    assert emu.record.connections[0].setup["model"] == f"publishers/google/models/{V38}"
    assert emu.vertex.exchanges == []
    bad = resolve(vertex_settings(gemini_api_key="not-the-key"), (V38,))
    with pytest.raises(errors.APIError) as caught:
        async with bad.client(types.HttpOptions()).aio.live.connect(
            model=V38, config=live_config()
        ):
            pass
    assert caught.value.code == 1007


async def test_transparent_handles_count_the_connections_messages(
    emu: LiveEmulator, vertex_env: Path
) -> None:
    """The setup is message 0, each message after it one more, per connection: a handle's
    index is the last message whose input its state holds (Google's session-manager guide,
    vertex-ai-samples live_api/references/session_manager.md)."""
    client = resolve(vertex_settings(), (V38,)).client(types.HttpOptions())
    async with client.aio.live.connect(model=V38, config=live_config()) as session:
        sent = await speak(session, bytes(6400), piece=640)  # 10 messages of silence
        update = await until(
            sdk.receive(session),
            lambda m: (
                indexed_handle(m)
                and m.session_resumption_update.last_consumed_client_message_index == sent
            ),
        )
        handle = update.session_resumption_update.new_handle
    async with client.aio.live.connect(model=V38, config=live_config(handle=handle)) as session:
        await speak(session, bytes(1920), piece=640)
        update = await until(
            sdk.receive(session),
            lambda m: (
                indexed_handle(m)
                and m.session_resumption_update.last_consumed_client_message_index == 3
            ),
        )
    resumed = emu.record.connections[1]
    assert resumed.resumed_from == handle
    assert emu.record.sessions[resumed.session_id].state.audio_bytes == 6400 + 1920


async def test_a_vertex_connection_ends_with_1000_cancelled(
    emu: LiveEmulator, vertex_env: Path
) -> None:
    emu.config.lifetime, emu.config.goaway_lead = 0.6, 0.3
    client = resolve(vertex_settings(), (V38,)).client(types.HttpOptions())
    async with client.aio.live.connect(model=V38, config=live_config()) as session:
        with pytest.raises(errors.APIError) as caught:
            await until(sdk.receive(session), lambda m: False)
    assert caught.value.code == 1000 and REASON_CANCELLED in str(caught.value)


# ------------------------------------------------------------------ calls through the gateway


@pytest.mark.parametrize("backend", ["vertex", "vertex_express"])
async def test_a_call_end_to_end_on_vertex(backend: BackendKind) -> None:
    async with test_bed(quick_emulator(), backend=backend) as bed:
        call = await bed.caller(speed=2.0).place_call()
        for n in (1, 2):
            await call.speak_tone(300.0 + 40 * n, 0.6)
            await await_reply(call, n, min_s=0.7, limit_s=15.0)
        await call.hangup()
        await asyncio.sleep(0.1)
        assert [r.n for r in heard_replies(call.record)] == [1, 2]
        record = bed.emulator.record
        [conn] = record.connections
        assert conn.setup["model"].endswith(f"publishers/google/models/{bed.settings.gemini_model}")
        assert conn.setup["sessionResumption"].get("transparent") is True
        exchanges = bed.emulator.vertex.exchanges
        assert len(exchanges) == (1 if backend == "vertex" else 0)
        sent = len(call.record.sent_ulaw) * 4
        (session,) = record.sessions.values()
        held = session.state.audio_bytes
        assert abs(held - sent) <= 0.02 * sent, (held, sent)
        sample = bed.metrics.registry.get_sample_value
        assert sample("gateway_calls_total", {"outcome": "completed"}) == 1
        # Usage in Vertex's words (candidatesTokenCount, candidatesTokensDetails): counted
        # as the emulator billed it.
        assert session.bill.tokens.get("response_audio", 0) > 0
        for kind, tokens in session.bill.tokens.items():
            side, modality = kind.split("_")
            labels = {"persona": "default", "kind": side, "modality": modality}
            assert sample("gateway_live_tokens_total", labels) == tokens, kind


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"GOOGLE_APPLICATION_CREDENTIALS": "/absent/key.json"},
            "gateway: Vertex AI: no Application Default Credentials",
        ),
        (
            {"GEMINI_MODEL": V25},
            "gateway: invalid setting GOOGLE_CLOUD_LOCATION: ",
        ),
    ],
    ids=["no-credentials", "2.5-in-global"],
)
def test_a_vertex_start_that_cannot_work_stops_with_one_line(
    env: dict[str, str], expected: str, tmp_path: Path
) -> None:
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-m", "gateway"],
        cwd=tmp_path,
        env={
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": str(root),
            "GATEWAY_CONFIG": str(root / "config" / "gateway.toml"),
            "PUBLIC_URL": PUBLIC_URL,
            "TWILIO_AUTH_TOKEN": "t" * 32,
            "GOOGLE_GENAI_USE_VERTEXAI": "true",
            "GOOGLE_CLOUD_PROJECT": PROJECT,
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), done.stderr


@pytest.mark.parametrize("cut", ["goaway", "abrupt"])
async def test_resets_on_vertex_lose_nothing_and_replay_nothing_twice(cut: str) -> None:
    """A call across five or more resets of either kind on Vertex, with input in flight for
    30 ms (so a handle lacks what was just written): the session holds every utterance once
    and the caller hears every reply once, in order (tests/survival_helpers); and since each
    handle names the last message it holds, no input is replayed twice: the session holds
    no more than the caller sent (less only by what a hang-up cut in flight)."""
    knobs: dict[str, object] = (
        {"lifetime": 1.8, "goaway_lead": 0.9}
        if cut == "goaway"
        else {"abrupt_after": 1.6, "abrupt_jitter": 0.8, "seed": 7}
    )
    config = quick_emulator(speed=SPEED, handle_interval=0.4, input_delay=0.03, **knobs)
    async with test_bed(config, backend="vertex") as bed:
        out = await run_call(bed, 10)
        record = bed.emulator.record
        problems = out.problems()
        assert not problems, f"{problems}; {out.figures()}"
        tail = 0.1 * 32000  # the last pieces, in flight at the hang-up
        assert out.sent_bytes - tail <= out.held_bytes <= out.sent_bytes, out.figures()
        resumed = [c for c in record.connections if c.resumed_from is not None]
        assert len(resumed) >= 5, out.figures()
        assert len(bed.emulator.vertex.exchanges) == 1  # one token serves every connection


# ------------------------------------------------------- handles placed by their message


def test_index_placement_counts_every_message_of_its_connection() -> None:
    """Each message written is numbered (the setup is 0); a handle naming message k holds
    the input of messages 1..k, whatever else was written or in flight."""
    placement = IndexPlacement()
    placement.sent(None)  # 1: a brief, no caller input yet
    for seq in (4, 5, 6):  # 2..4: replayed input
        placement.sent(seq)
    placement.sent(None)  # 5: a tool response
    placement.sent(7)  # 6
    assert placement.covered(9.0, consumed=1) is None  # only the brief: nothing to place
    assert placement.newest() is None  # and nothing in doubt beyond it
    assert placement.covered(9.0, consumed=3) == 5
    assert placement.covered(9.0, consumed=3) == 5  # the same index again
    assert placement.covered(9.0, consumed=5) == 6  # the tool response adds no input
    assert placement.newest() == 6
    assert placement.covered(9.0, consumed=6) == 7
    # A handle without an index falls back on the round trip.
    placement.written(8, 10.0)
    placement.sent(8)
    assert placement.covered(10.01, consumed=None) is None  # within the guard
    assert placement.covered(11.0, consumed=None) == 8


def exact_machine() -> tuple[SessionMachine, int]:
    m = SessionMachine(LiveSettings(goaway_margin_s=0.5), random.Random(1), exact=True)
    (first,) = [a for a in m.start(0.0) if isinstance(a, Open)]
    m.opened(first.conn, 0.1)
    return m, first.conn


def test_a_reset_replays_exactly_what_the_named_message_lacks() -> None:
    m, old = exact_machine()
    for k in range(10):  # ten messages, one input each
        m.caller_audio(b"\x00" * 640, False, 0.2 + k * 0.02)
        m.sent(old, m.seq)
        m.written(old, m.seq, 0.2 + k * 0.02)
    # Read at once (no guard could place any of it): the service says it holds message 7.
    m.handle_update(old, "H1", True, 0.4, consumed=7)
    assert (m.handle, m.base) == ("H1", 7)
    actions = m.lost(old, LossKind.NETWORK, "reset", 0.5)
    (reopen,) = [a for a in actions if isinstance(a, Open)]
    assert reopen.handle == "H1"
    actions = m.opened(reopen.conn, 0.7)
    (replay,) = [a for a in actions if isinstance(a, Write)]
    assert [i.seq for i in replay.items] == [8, 9, 10]
    (resumed,) = [a.event for a in actions if isinstance(a, Emit) and type(a.event) is Resumed]
    assert resumed.overlap_s == 0.0


class RoundTripAnyway(SessionMachine):
    """Places handles by the round trip though the service names their message."""

    def _placement(self) -> Placement:
        return RoundTripPlacement()


@pytest.mark.parametrize("concurrency", ["fork", "takeover", "refuse"])
def test_explorer_transparent_resets_send_nothing_twice(concurrency: Concurrency) -> None:
    report = explore(concurrency, range(300), stop_after=1, transparent=True)
    assert report.failures == [], report.failures[0]
    assert report.resets > 300 and report.overlap_frames == 0


def test_explorer_catches_input_sent_twice_with_a_named_message() -> None:
    report = explore("fork", range(100), stop_after=1, factory=RoundTripAnyway, transparent=True)
    assert report.failures and report.failures[0][1].check == "no-duplicate"
