"""Several gateway replicas in one event loop: one Live emulator, one Redis, N apps.

What a load balancer in front of replicas looks like to Twilio: the same PUBLIC_URL and
auth token on every replica, a request may land on any of them. The replicas share the
call-state store through ``REDIS_URL`` (a real ``redis-server``: `redis_server`).
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from gateway.metrics import Metrics
from gateway.personas import PersonaTable
from gateway.server import create_app, start_server
from gateway.testing.harness import TestBed, environment, test_settings
from gateway.testing.live_emulator import EmulatorConfig, LiveEmulator
from gateway.testing.tls import make_tls


@asynccontextmanager
async def replicas(
    count: int,
    redis_url: str,
    emulator_config: EmulatorConfig | None = None,
    **settings_overrides: Any,
) -> AsyncIterator[list[TestBed]]:
    """Start the emulator and ``count`` gateways sharing ``redis_url``; stop all on exit.

    Each replica is a :class:`TestBed` of its own (its app, metrics and URL); they share
    the emulator and one HTTP client session.
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
                        settings, PersonaTable.from_settings(settings), metrics=metrics
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
