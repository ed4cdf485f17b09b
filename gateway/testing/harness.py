"""A whole test bed in one event loop: Live emulator, real gateway, simulated callers.

Used by the tests and the demo. The gateway's Live client finds the emulator
the way an operator would point it anywhere: GOOGLE_GEMINI_BASE_URL and
SSL_CERT_FILE, which the google-genai SDK reads when the client is created.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
from aiohttp import web

from gateway.config import Settings
from gateway.metrics import Metrics
from gateway.personas import PersonaTable
from gateway.server import create_app, start_server
from gateway.testing.live_emulator import EmulatorConfig, LiveEmulator
from gateway.testing.service_account import service_account_file
from gateway.testing.tls import TestTLS, make_tls
from gateway.testing.twilio_sim import SimulatedCall, TwilioCallerSimulator
from gateway.twilio.rest import TwilioRest

PUBLIC_URL = "https://gateway.example.test"
AUTH_TOKEN = "test-auth-token-0123456789abcdef"
VERTEX_PROJECT = "gateway-test-project"
VERTEX_LOCATION = "us-central1"
#: The Live backend a test bed's gateway uses: the Gemini API (a key), Vertex AI with a
#: service account (the real OAuth exchange with the emulator), Vertex AI express mode.
BackendKind = Literal["gemini", "vertex", "vertex_express"]


def quick_emulator(speed: float = 2.0, **overrides: object) -> EmulatorConfig:
    """Emulator knobs for short test calls: brief replies and pauses, time compressed.

    Setups are answered at once and a resume beside an open connection forks the session
    (not the emulator's defaults, which follow what the real service is reported to do):
    the tests written against that behaviour keep it; the survival corners set their own.
    """
    config = EmulatorConfig()
    config.setup_latency = (0.0, 0.0)
    config.concurrent_resume = "fork"
    config.reply_s = 0.8
    config.end_of_speech_s = 0.4
    config.response_delay_s = 0.1
    config.handle_interval = 0.5
    config.speed = speed
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise AttributeError(f"EmulatorConfig has no knob {key!r}")
        setattr(config, key, value)
    return config


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a process to serve on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables for the block, then restore them."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@dataclass
class TestBed:
    """Everything a call needs, running."""

    emulator: LiveEmulator
    app: web.Application
    settings: Settings
    metrics: Metrics
    gateway_url: str
    http: aiohttp.ClientSession
    callers: list[TwilioCallerSimulator] = field(default_factory=list)

    def caller(self, speed: float = 1.0) -> TwilioCallerSimulator:
        """A simulated Twilio that calls this gateway."""
        caller = TwilioCallerSimulator(
            self.http, self.gateway_url, PUBLIC_URL, AUTH_TOKEN, speed=speed
        )
        self.callers.append(caller)
        return caller

    def placed_call(self, call_sid: str | None) -> SimulatedCall | None:
        """The call ``call_sid`` one of this bed's callers placed, if any."""
        for caller in self.callers:
            if (call := caller.calls.get(call_sid or "")) is not None:
                return call
        return None


#: The Live model of the settings' default, and the one test beds use now (the tests set it
#: per profile: tests/conftest.py, `per_profile`).
DEFAULT_MODEL = "gemini-3.8-live"
MODEL = DEFAULT_MODEL


def test_settings(api_key: str | None, **overrides: Any) -> Settings:
    """Gateway settings for the test bed (no config file, no environment)."""
    values: dict[str, Any] = {
        "gemini_model": MODEL,
        "public_url": PUBLIC_URL,
        "twilio_auth_token": AUTH_TOKEN,
        "gemini_api_key": api_key,
        "host": "127.0.0.1",
        "port": 0,
        "reconnect_total_s": 10.0,
        "goaway_margin_s": 0.2,
        "connect_timeout_s": 5.0,
        "greeting": "",  # tests count replies from the caller's first turn; some turn it on
        # Simulated callers compress time (speed 2 sends audio twice as fast as real time).
        "caller_audio_rate": 64.0,  # the fastest test compresses time 40 times
        "caller_send_buffer_s": 120.0,  # seconds of audio, so likewise
    }
    values.update(overrides)
    return Settings.model_validate(values)


def backend_setup(
    backend: BackendKind, emulator: LiveEmulator, tls: TestTLS, directory: Path
) -> tuple[dict[str, str], dict[str, Any]]:
    """The environment a test bed's gateway starts in and the settings it gets for
    `backend`, each pointing at the emulator as an operator would point the SDK anywhere."""
    env = {"SSL_CERT_FILE": tls.ca_pem_path}
    if backend == "gemini":
        return {**env, "GOOGLE_GEMINI_BASE_URL": emulator.base_url}, {}
    env["GOOGLE_VERTEX_BASE_URL"] = emulator.base_url
    values: dict[str, Any] = {"vertexai": True, "google_cloud_location": VERTEX_LOCATION}
    if backend == "vertex_express":
        return env, {**values, "gemini_api_key": emulator.config.vertex_api_key}
    account = service_account_file(directory / "gcp", emulator, VERTEX_PROJECT)
    env["GOOGLE_APPLICATION_CREDENTIALS"] = str(account)
    env["REQUESTS_CA_BUNDLE"] = tls.ca_pem_path  # the token exchange goes through requests
    return env, {**values, "gemini_api_key": None, "google_cloud_project": VERTEX_PROJECT}


@asynccontextmanager
async def test_bed(
    emulator_config: EmulatorConfig | None = None,
    workdir: Path | None = None,
    *,
    rest: TwilioRest | None = None,
    backend: BackendKind = "gemini",
    **settings_overrides: Any,
) -> AsyncIterator[TestBed]:
    """Start the emulator and the gateway; stop both (and every call) on exit.

    `rest` is the gateway's Twilio REST client (e.g. one pointed at the stand-in in
    `gateway.testing.twilio_rest`); it stays the caller's to close.
    """
    with tempfile.TemporaryDirectory() as tmp:
        tls = make_tls(workdir or Path(tmp))
        emulator = LiveEmulator(emulator_config or EmulatorConfig(), tls)
        await emulator.start()
        try:
            env, values = backend_setup(backend, emulator, tls, Path(tmp))
            key = values.pop("gemini_api_key", emulator.config.api_key)
            settings = test_settings(key, **values, **settings_overrides)
            personas = PersonaTable.from_settings(settings)
            metrics = Metrics()
            app = create_app(settings, personas, rest=rest, metrics=metrics)
            # The app creates its Live client at startup, reading these as the SDK does (and
            # google-auth reads REQUESTS_CA_BUNDLE at each token refresh: set throughout).
            with environment(**env):
                runner = await start_server(app, "127.0.0.1", 0)
            port = runner.addresses[0][1]
            connector = aiohttp.TCPConnector(limit=0)
            token_ca = {k: v for k, v in env.items() if k == "REQUESTS_CA_BUNDLE"}
            async with aiohttp.ClientSession(connector=connector) as http:
                try:
                    with environment(**token_ca):
                        yield TestBed(
                            emulator=emulator,
                            app=app,
                            settings=settings,
                            metrics=metrics,
                            gateway_url=f"http://127.0.0.1:{port}",
                            http=http,
                        )
                finally:
                    await runner.cleanup()
        finally:
            await emulator.stop()


# Not tests themselves, though their names start with "test" (pytest would collect them).
TestBed.__test__ = False  # type: ignore[attr-defined]
test_bed.__test__ = False  # type: ignore[attr-defined]
test_settings.__test__ = False  # type: ignore[attr-defined]
