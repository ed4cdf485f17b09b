"""Several gateway replicas: in one event loop (one Live emulator, one Redis, N apps), or
as ``python -m gateway`` processes.

What a load balancer in front of replicas looks like to Twilio: the same PUBLIC_URL and
auth token on every replica, a request may land on any of them. The replicas share the
call-state store through ``REDIS_URL`` (a real ``redis-server``: `redis_server`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from gateway.metrics import Metrics
from gateway.personas import PersonaTable
from gateway.server import create_app, start_server
from gateway.testing.harness import (
    AUTH_TOKEN,
    PUBLIC_URL,
    TestBed,
    environment,
    free_port,
    test_settings,
)
from gateway.testing.live_emulator import EmulatorConfig, LiveEmulator
from gateway.testing.tls import make_tls
from gateway.twilio.rest import TwilioRest


@asynccontextmanager
async def replicas(
    count: int,
    redis_url: str,
    emulator_config: EmulatorConfig | None = None,
    *,
    rest: TwilioRest | None = None,
    **settings_overrides: Any,
) -> AsyncIterator[list[TestBed]]:
    """Start the emulator and ``count`` gateways sharing ``redis_url``; stop all on exit.

    Each replica is a :class:`TestBed` of its own (its app, metrics and URL); they share
    the emulator, one HTTP client session and ``rest`` (their Twilio REST client, e.g. one
    aimed at `gateway.testing.twilio_rest`'s stand-in; the caller's to close).
    """
    with tempfile.TemporaryDirectory() as tmp:
        tls = make_tls(Path(tmp))
        emulator = LiveEmulator(emulator_config or EmulatorConfig(), tls)
        await emulator.start()
        try:
            settings = test_settings(
                emulator.config.api_key, redis_url=redis_url, **settings_overrides
            )
            async with AsyncExitStack() as stack:
                http = await stack.enter_async_context(
                    aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
                )
                beds = []
                for _ in range(count):
                    metrics = Metrics()
                    app = create_app(
                        settings, PersonaTable.from_settings(settings), rest=rest, metrics=metrics
                    )
                    with environment(
                        GOOGLE_GEMINI_BASE_URL=emulator.base_url, SSL_CERT_FILE=tls.ca_pem_path
                    ):
                        runner = await start_server(app, "127.0.0.1", 0)
                    stack.push_async_callback(runner.cleanup)
                    port = runner.addresses[0][1]
                    beds.append(
                        TestBed(emulator, app, settings, metrics, f"http://127.0.0.1:{port}", http)
                    )
                yield beds
        finally:
            await emulator.stop()


_ROOT = str(Path(__file__).resolve().parents[2])  # where `gateway` is imported from


@dataclass
class GatewayProcess:
    """``python -m gateway`` in a subprocess, its merged output collected line by line."""

    proc: asyncio.subprocess.Process
    url: str
    lines: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def messages(self) -> list[str]:
        """The log lines' messages (JSON logs)."""
        found = []
        for line in self.lines:
            with contextlib.suppress(ValueError):
                found.append(str(json.loads(line).get("msg", "")))
        return found

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    async def exit_code(self, limit_s: float) -> int:
        async with asyncio.timeout(limit_s):
            code = await self.proc.wait()
        if self.reader is not None:
            await asyncio.wait({self.reader}, timeout=5.0)
        return code


@asynccontextmanager
async def processes(
    count: int, emulator: LiveEmulator, ca_pem_path: str, **env: str
) -> AsyncIterator[list[GatewayProcess]]:
    """``count`` gateway processes against ``emulator`` (``env`` on top of the test bed's
    settings: give them the same ``REDIS_URL`` to make them replicas); each is healthy when
    the block starts, and killed if still running when it ends."""
    started: list[GatewayProcess] = []
    try:
        for _ in range(count):
            port = free_port()
            values = {
                "PATH": os.environ.get("PATH", ""),
                "PYTHONPATH": _ROOT,
                "GATEWAY_CONFIG": "",  # no file: only these settings
                "PUBLIC_URL": PUBLIC_URL,
                "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
                "GEMINI_API_KEY": emulator.config.api_key,
                "GOOGLE_GEMINI_BASE_URL": emulator.base_url,
                "SSL_CERT_FILE": ca_pem_path,
                "HOST": "127.0.0.1",
                "PORT": str(port),
                **env,
            }
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway",
                env=values,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            gateway = GatewayProcess(proc, f"http://127.0.0.1:{port}")
            gateway.reader = asyncio.create_task(gateway._read())
            started.append(gateway)
        async with aiohttp.ClientSession() as http:
            for gateway in started:
                await _wait_healthy(http, gateway)
        yield started
    finally:
        for gateway in started:
            if gateway.proc.returncode is None:
                gateway.proc.kill()
                await gateway.proc.wait()
            if gateway.reader is not None:
                await asyncio.wait({gateway.reader}, timeout=5.0)


async def _wait_healthy(http: aiohttp.ClientSession, gateway: GatewayProcess) -> None:
    for _ in range(600):
        if gateway.proc.returncode is not None:
            raise RuntimeError(f"gateway exited: {gateway.output[-2000:]}")
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(gateway.url + "/healthz") as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"gateway not healthy: {gateway.output[-2000:]}")
