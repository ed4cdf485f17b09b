"""Operations: health and readiness, Prometheus metrics and JSON logs of a real (simulated)
call, start-up refusal on bad configuration, and graceful drain of a real gateway process.

The drain tests run `python -m gateway` as a subprocess, configured only by environment
variables as in a container, against the Live emulator and the Twilio simulator running in
the test's event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from twilio.request_validator import RequestValidator

from gateway.logs import JsonFormatter, call_filter
from gateway.server import STATE, start_draining, wait_calls_done
from gateway.testing.analysis import await_reply, heard_replies
from gateway.testing.harness import (
    AUTH_TOKEN,
    PUBLIC_URL,
    TestBed,
    free_port,
    quick_emulator,
    test_bed,
)
from gateway.testing.live_emulator import EmulatorConfig, LiveEmulator
from gateway.testing.replicas import GatewayProcess
from gateway.testing.tls import make_tls
from gateway.testing.twilio_sim import (
    CallRecord,
    CallRejected,
    SimulatedCall,
    TwilioCallerSimulator,
)

if TYPE_CHECKING:
    from conftest import Eventually, LogCapture

ROOT = Path(__file__).resolve().parents[1]
SPEED = 2.0
CALL_SID = re.compile(r"CA[0-9a-fA-F]{32}")
STREAM_SID = re.compile(r"MZ[0-9a-fA-F]{32}")
PHONE = re.compile(r"\+?\d{7,15}")


def emulator_config(**overrides: float) -> EmulatorConfig:
    """Short replies, quicker turn-taking, time compressed like the callers."""
    return quick_emulator(
        **{"speed": SPEED, "end_of_speech_s": 0.3, "handle_interval": 0.3, **overrides}
    )


def complete_replies(record: CallRecord, min_s: float = 0.75) -> list[int]:
    return [r.n for r in heard_replies(record) if r.duration_s >= min_s]


async def wait_reply(call: SimulatedCall, n: int, limit_s: float = 15.0) -> None:
    """Keep the line open (Twilio streams silence too) until reply `n` was heard whole and
    its last chunk has played (a hang-up right after cuts the chunk playing)."""
    await await_reply(call, n, min_s=0.75, limit_s=limit_s)


async def turn(call: SimulatedCall, n: int, freq: float = 350.0) -> None:
    await call.speak_tone(freq, 0.6)
    await wait_reply(call, n)


async def barge_in(call: SimulatedCall, n: int, freq: float = 390.0) -> None:
    """Speak, let reply `n` start, talk over it; reply n + 1 answers the interruption."""
    await call.speak_tone(freq, 0.6)
    deadline = time.monotonic() + 10.0
    while not any(r.n == n for r in heard_replies(call.record)):
        assert time.monotonic() < deadline, "reply never started"
        await call.silence(0.1)
    await call.silence(0.1)
    await call.speak_tone(freq, 0.5)
    await wait_reply(call, n + 1)


# --------------------------------------------------------------- health and readiness


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
        return resp.status, await resp.text()


async def test_health_and_readiness_follow_calls_and_drain(eventually: Eventually) -> None:
    async with test_bed(emulator_config(), max_calls=1) as bed:
        url = bed.gateway_url
        assert await get(bed.http, url + "/healthz") == (200, "ok\n")
        assert await get(bed.http, url + "/readyz") == (200, "ready\n")

        call = await bed.caller(speed=SPEED).place_call()
        state = bed.app[STATE]
        await eventually(lambda: state.streams.sockets)
        # At MAX_CALLS: not ready (one line saying why), the next call is turned away busy.
        assert await get(bed.http, url + "/readyz") == (503, "at call limit\n")
        with pytest.raises(CallRejected) as turned_away:
            await bed.caller(speed=SPEED).place_call()
        assert "<Reject" in turned_away.value.body and 'reason="busy"' in turned_away.value.body
        assert await get(bed.http, url + "/healthz") == (200, "ok\n")
        await call.hangup()
        await eventually(lambda: not state.streams.sockets)
        assert await get(bed.http, url + "/readyz") == (200, "ready\n")

        start_draining(bed.app)
        assert await get(bed.http, url + "/readyz") == (503, "draining\n")
        assert await get(bed.http, url + "/healthz") == (200, "ok\n")
        rejected = bed.metrics.registry.get_sample_value
        assert rejected("gateway_requests_rejected_total", {"reason": "busy"}) == 1


async def test_the_drain_counts_calls_and_streams_waiting_for_start_apart(
    logs: LogCapture, eventually: Eventually
) -> None:
    """A stream that has not sent `start` is not a call in the drain's log; the drain still
    waits for it (it may yet start), and its start deadline closes it."""
    async with test_bed(emulator_config(), start_timeout_s=1.0) as bed:
        state = bed.app[STATE]
        call = await bed.caller(speed=SPEED).place_call()
        await eventually(lambda: state.calls)
        url = PUBLIC_URL.replace("https://", "wss://") + "/twilio/media"
        signed = {"X-Twilio-Signature": RequestValidator(AUTH_TOKEN).compute_signature(url, {})}
        silent = [
            await bed.http.ws_connect(bed.gateway_url + "/twilio/media", headers=signed)
            for _ in range(2)
        ]
        await eventually(lambda: len(state.admission.waiting) == 2)

        start_draining(bed.app)
        assert logs.messages("gateway.server", "draining") == [
            "draining: 1 call(s) and 2 stream(s) waiting for start in progress"
        ]
        assert not await wait_calls_done(bed.app, 0.2)  # the call goes on
        await call.hangup()
        assert await wait_calls_done(bed.app, 10.0)  # the silent streams were closed
        assert state.in_progress() == "0 call(s)"
        for ws in silent:
            await ws.close()


# ------------------------------------------------------ a real call: metrics and logs


@dataclass
class ScriptedCall:
    """What one scripted call left behind: /metrics text, log records, the caller's record."""

    metrics_text: str
    records: list[logging.LogRecord]
    record: CallRecord
    emulator_events: list[tuple[float, str, str]]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.addFilter(call_filter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def _scripted_call(bed: TestBed) -> CallRecord:
    """Four turns: a plain one, a barge-in, then across a goAway switch, one more."""
    async with await bed.caller(speed=SPEED).place_call() as call:
        await turn(call, 1, 330.0)
        await barge_in(call, 2, 370.0)  # reply 2 cut, reply 3 answers the interruption
        deadline = time.monotonic() + 15.0
        while not any(
            kind == "setup" and "resumed=True" in detail
            for _, kind, detail in bed.emulator.record.events
        ):
            assert time.monotonic() < deadline, "no goAway switch"
            await call.silence(0.2)
        await turn(call, 4, 410.0)
        await call.hangup()
        return call.record


async def _run_scripted_call(eventually: Eventually) -> ScriptedCall:
    collect = _Collect()
    root = logging.getLogger()
    saved_level = root.level
    try:
        # goAway 2.5 s into each connection: the call outlives its first connection.
        config = emulator_config(lifetime=4.0, goaway_lead=1.5)
        config.concurrent_resume = "fork"  # make before break: the goAway switch's log line
        async with test_bed(config) as bed:
            # From here on: the app's start-up lines (the SDK path, logged once per process
            # by the first app built) are not the call's.
            root.addHandler(collect)
            root.setLevel(logging.INFO)
            record = await _scripted_call(bed)
            await eventually(lambda: not bed.app[STATE].streams.sockets)
            async with bed.http.get(bed.gateway_url + "/metrics") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                text = await resp.text()
            events = list(bed.emulator.record.events)
    finally:
        root.removeHandler(collect)
        root.setLevel(saved_level)
    return ScriptedCall(text, collect.records, record, events)


@pytest.fixture(scope="module")
def scripted_call(eventually: Eventually) -> ScriptedCall:
    """One call shared by the metrics and logs tests (it takes a few seconds)."""
    return asyncio.run(_run_scripted_call(eventually))


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, frozenset(s.labels.items()))] = s.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


def test_the_call_itself_went_as_scripted(scripted_call: ScriptedCall) -> None:
    assert complete_replies(scripted_call.record) == [1, 3, 4]
    assert scripted_call.record.clears, "the barge-in cleared Twilio's playback"
    assert any(kind == "goaway" for _, kind, _ in scripted_call.emulator_events)


def test_metrics_count_the_call(scripted_call: ScriptedCall) -> None:
    text, rec = scripted_call.metrics_text, scripted_call.record
    v = value
    assert v(text, "gateway_calls_total", outcome="completed") == 1
    assert v(text, "gateway_calls_active") == 0
    assert v(text, "gateway_call_duration_seconds_count") == 1
    # Every 20 ms frame the caller sent was counted (stop comes after them on one socket).
    assert v(text, "gateway_caller_audio_frames_total") == len(rec.sent_ulaw) // 160
    # Three whole replies of 0.8 s reached the caller, and part of the cut one.
    assert v(text, "gateway_model_audio_seconds_total") >= 3 * 0.8 * 0.95
    assert v(text, "gateway_barge_ins_total") >= 1
    assert v(text, "gateway_live_goaway_total") >= 1
    assert v(text, "gateway_live_resumptions_total", cause="goaway") >= 1
    assert v(text, "gateway_live_reset_gap_seconds_count", cause="goaway") >= 1
    assert v(text, "gateway_live_connections_total", kind="fresh") == 1
    assert v(text, "gateway_live_connections_total", kind="resumed") >= 1
    for direction in ("caller_to_model", "model_to_caller"):
        assert v(text, "gateway_added_latency_seconds_count", direction=direction) > 0

    counting = {
        family.name
        for family in text_string_to_metric_families(text)
        if family.name.startswith("gateway_") and any(s.value > 0 for s in family.samples)
    }
    assert len(counting) >= 8, sorted(counting)
    assert any(f.name.startswith("process_") for f in text_string_to_metric_families(text))


def test_metrics_carry_no_call_identifiers(scripted_call: ScriptedCall) -> None:
    text, rec = scripted_call.metrics_text, scripted_call.record
    assert rec.call_sid not in text and rec.stream_sid not in text
    for (name, labels), _ in samples(text).items():
        if not name.startswith("gateway_"):
            continue
        for label, val in labels:
            if label == "le":
                continue
            assert not CALL_SID.search(val), (name, label, val)
            assert not STREAM_SID.search(val), (name, label, val)
            assert not PHONE.fullmatch(val), (name, label, val)


def test_a_call_leaves_a_few_log_lines_each_with_the_call(scripted_call: ScriptedCall) -> None:
    rec = scripted_call.record
    gateway_records = [
        r
        for r in scripted_call.records
        if r.name.startswith("gateway") and not r.name.startswith("gateway.testing")
    ]
    messages = [r.getMessage() for r in gateway_records]
    assert any(m == "call started" for m in messages), messages
    assert any(m.startswith("call ended (completed)") for m in messages), messages
    assert any("goAway" in m for m in messages), messages
    frames = len(rec.sent_ulaw) // 160
    assert frames > 300
    assert len(gateway_records) < 30, messages  # a few lines per call, not one per frame
    formatter = JsonFormatter()
    for record in gateway_records:
        line = formatter.format(record)
        assert "\n" not in line
        obj = json.loads(line)
        assert obj["call_sid"] == rec.call_sid, obj
        assert obj["stream_sid"] == rec.stream_sid, obj
        assert {"ts", "level", "logger", "msg"} <= obj.keys()


# ------------------------------------------------------------ configuration at start


def base_env(**values: str) -> dict[str, str]:
    """A container-like environment: only what is set here, no developer settings."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT),
        "GATEWAY_CONFIG": str(ROOT / "config" / "gateway.toml"),
    }
    env.update(values)
    return env


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"TWILIO_AUTH_TOKEN": AUTH_TOKEN, "GEMINI_API_KEY": "k"},
            "gateway: missing setting PUBLIC_URL",
        ),
        (
            {"GOOGLE_API_KEY": "k"},
            "gateway: missing settings PUBLIC_URL, TWILIO_AUTH_TOKEN",
        ),
        (
            {
                "PUBLIC_URL": PUBLIC_URL,
                "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
                "GEMINI_API_KEY": "k",
                "PORT": "eighty",
            },
            "gateway: invalid setting PORT: ",
        ),
        (
            {
                "PUBLIC_URL": "http://gateway.example.test",
                "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
                "GEMINI_API_KEY": "k",
            },
            "gateway: invalid setting PUBLIC_URL: must be https://",
        ),
        (
            {
                "PUBLIC_URL": PUBLIC_URL,
                "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
                "GEMINI_API_KEY": "k",
                "GATEWAY_CONFIG": "/app/config/gateway.tom",
            },
            "gateway: invalid setting GATEWAY_CONFIG: /app/config/gateway.tom is not a file",
        ),
        (
            {
                "PUBLIC_URL": PUBLIC_URL,
                "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
                "GEMINI_API_KEY": "k",
                "TRANSCRIPT_DIR": "/dev/null/transcripts",
            },
            "gateway: invalid setting TRANSCRIPT_DIR: /dev/null/transcripts: Not a directory",
        ),
    ],
    ids=[
        "missing-public-url",
        "missing-two",
        "malformed-port",
        "http-public-url",
        "no-file",
        "transcripts-unwritable",
    ],
)
def test_bad_configuration_stops_the_start_with_one_line(
    env: dict[str, str], expected: str, tmp_path: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway"],
        cwd=tmp_path,
        env=base_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2  # docs/configuration.md documents it
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(expected), lines
    assert AUTH_TOKEN not in done.stderr


def test_a_port_in_use_stops_the_start_with_one_line(tmp_path: Path) -> None:
    """Another process holds the port: one line saying so, status 2; no traceback, and
    nothing the start had opened left behind to complain at exit."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"PUBLIC_URL": PUBLIC_URL, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "GEMINI_API_KEY": "k"}
        env |= {"HOST": "127.0.0.1", "PORT": str(port), "LOG_FORMAT": "console"}
        done = subprocess.run(
            [sys.executable, "-m", "gateway"],
            cwd=tmp_path,
            env=base_env(**env),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert lines[-1] == f"gateway: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert not [line for line in lines if " ERROR " in line or "Traceback" in line], lines


def test_help_names_the_required_settings_and_the_docs(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "--help"],
        cwd=tmp_path,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    for name in ("PUBLIC_URL", "TWILIO_AUTH_TOKEN", "GEMINI_API_KEY or GOOGLE_API_KEY"):
        assert name in done.stdout
    assert "docs/configuration.md" in done.stdout
    assert (ROOT / "docs" / "configuration.md").exists()


def test_the_call_command_names_the_twilio_settings_it_misses_and_no_key(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "call", "--to", "+15557654321"],
        cwd=tmp_path,
        env=base_env(PUBLIC_URL=PUBLIC_URL),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr == "gateway: missing settings TWILIO_AUTH_TOKEN, TWILIO_ACCOUNT_SID\n"


# --------------------------------------------------------------- drain, as a process


@dataclass
class Stage:
    """The Live emulator plus a gateway process talking to it, and a way to call it."""

    emulator: LiveEmulator
    gateway: GatewayProcess
    http: aiohttp.ClientSession

    def caller(self) -> TwilioCallerSimulator:
        return TwilioCallerSimulator(
            self.http, self.gateway.url, PUBLIC_URL, AUTH_TOKEN, speed=SPEED
        )

    async def get(self, path: str) -> tuple[int, str]:
        return await get(self.http, self.gateway.url + path)


@asynccontextmanager
async def stage(**env: str) -> AsyncIterator[Stage]:
    with tempfile.TemporaryDirectory() as tmp:
        tls = make_tls(Path(tmp))
        async with LiveEmulator(emulator_config(), tls) as emulator:
            port = free_port()
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway",
                cwd=tmp,
                env=base_env(
                    PUBLIC_URL=PUBLIC_URL,
                    TWILIO_AUTH_TOKEN=AUTH_TOKEN,
                    GEMINI_API_KEY=emulator.config.api_key,
                    GOOGLE_GEMINI_BASE_URL=emulator.base_url,
                    SSL_CERT_FILE=tls.ca_pem_path,
                    HOST="127.0.0.1",
                    PORT=str(port),
                    GOAWAY_MARGIN_S="0.2",
                    GREETING="",  # the scripts count replies from the caller's first turn
                    CALLER_AUDIO_RATE=str(2 * SPEED),  # the simulated caller compresses time
                    **env,
                ),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            gateway = GatewayProcess(proc, f"http://127.0.0.1:{port}")
            gateway.reader = asyncio.create_task(gateway._read())
            try:
                async with aiohttp.ClientSession() as http:
                    here = Stage(emulator, gateway, http)
                    await _wait_healthy(here)
                    yield here
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
                await asyncio.wait({gateway.reader}, timeout=5.0)


async def _wait_healthy(here: Stage) -> None:
    deadline = time.monotonic() + 30.0
    while True:
        assert here.gateway.proc.returncode is None, here.gateway.output
        try:
            if (await here.get("/healthz"))[0] == 200:
                return
        except aiohttp.ClientError:
            pass
        assert time.monotonic() < deadline, here.gateway.output
        await asyncio.sleep(0.05)


async def _open_stream_directly(here: Stage) -> None:
    """A media stream upgrade for a call whose webhook another replica answered."""
    url = PUBLIC_URL.replace("https://", "wss://") + "/twilio/media"
    signature = RequestValidator(AUTH_TOKEN).compute_signature(url, {})
    ws = await here.http.ws_connect(
        here.gateway.url.replace("http://", "ws://") + "/twilio/media",
        headers={"X-Twilio-Signature": signature},
    )
    await ws.close()


async def _readiness_fails(here: Stage) -> float:
    """Seconds from now until /readyz first answers 503."""
    started = time.monotonic()
    while True:
        status, body = await here.get("/readyz")
        if status == 503:
            assert body == "draining\n"
            return time.monotonic() - started
        assert time.monotonic() - started < 5.0
        await asyncio.sleep(0.01)


def json_lines(output: str) -> Iterator[dict[str, object]]:
    for line in output.splitlines():
        obj = json.loads(line)  # every line is one JSON object
        assert isinstance(obj, dict)
        yield obj


async def test_sigterm_drains_a_call_in_progress_then_exits_zero() -> None:
    async with stage(DRAIN_TIMEOUT="60") as here:
        assert await here.get("/readyz") == (200, "ready\n")
        await _open_stream_directly(here)  # accepted now; refused once draining

        call = await here.caller().place_call()
        await turn(call, 1, 330.0)
        await call.speak_tone(370.0, 0.6)  # the model is about to answer turn 2

        here.gateway.signal(signal.SIGTERM)
        hearing = asyncio.create_task(wait_reply(call, 2))
        took = await _readiness_fails(here)
        assert took < 0.5, took
        assert await here.get("/healthz") == (200, "ok\n")
        with pytest.raises(CallRejected) as turned_away:
            await here.caller().place_call()
        assert 'reason="busy"' in turned_away.value.body
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await _open_stream_directly(here)
        assert refused.value.status == 503
        status, metrics = await here.get("/metrics")
        assert status == 200
        assert value(metrics, "gateway_requests_rejected_total", reason="draining") == 1
        assert value(metrics, "gateway_requests_rejected_total", reason="stream_draining") == 1
        assert value(metrics, "gateway_calls_active") == 1

        await hearing
        await turn(call, 3, 410.0)  # the call carries on as if nothing happened
        assert here.gateway.proc.returncode is None
        await call.hangup()
        assert await here.gateway.exit_code(20.0) == 0

    assert complete_replies(call.record) == [1, 2, 3]
    assert call.record.closed_by == "caller"
    out = here.gateway.output
    logs = list(json_lines(out))
    messages = [str(o["msg"]) for o in logs]
    assert any(m.startswith("signal 15: draining") for m in messages), messages
    assert messages[-1] == "stopped", messages
    for o in logs:
        if str(o["msg"]).startswith(("call started", "call ended")):
            assert o["call_sid"] == call.record.call_sid
            assert o["stream_sid"] == call.record.stream_sid
    assert AUTH_TOKEN not in out


async def test_second_sigterm_exits_at_once_and_says_so() -> None:
    async with stage(DRAIN_TIMEOUT="60", LOG_FORMAT="console") as here:
        call = await here.caller().place_call()
        await turn(call, 1)
        here.gateway.signal(signal.SIGTERM)
        await _readiness_fails(here)
        here.gateway.signal(signal.SIGTERM)
        # Cut short: 128 + SIGTERM, the shell's "ended by a signal", not a clean 0.
        assert await here.gateway.exit_code(5.0) == 128 + signal.SIGTERM
        await call.wait_closed(5.0)
        await call.hangup()
    out = here.gateway.output
    assert "second signal 15: exiting now, cutting 1 call(s)" in out
    assert not any(line.startswith("{") for line in out.splitlines()), out  # console format


async def test_drain_timeout_closes_the_calls_left_and_exits_zero() -> None:
    async with stage(DRAIN_TIMEOUT="1", LOG_LEVEL="WARNING") as here:
        call = await here.caller().place_call()
        await turn(call, 1)
        here.gateway.signal(signal.SIGTERM)
        deadline = time.monotonic() + 10.0
        while not call.closed:  # the caller stays on the line past the drain timeout
            assert time.monotonic() < deadline, "the call was never closed"
            await call.silence(0.1)
        assert call.record.closed_by == "gateway"
        assert call.record.close_code == aiohttp.WSCloseCode.GOING_AWAY
        assert await here.gateway.exit_code(10.0) == 0
        await call.hangup()
    messages = [str(o["msg"]) for o in json_lines(here.gateway.output)]
    assert "drain timeout: closing 1 call(s) still in progress" in messages, messages
    # LOG_LEVEL=WARNING: the info lines (listening, draining, call started) are left out.
    assert not any(m.startswith(("listening", "call started")) for m in messages), messages
