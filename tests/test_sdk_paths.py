"""The private google-genai names the gateway relies on (gateway/live/sdk.py) still work.

If an SDK upgrade moves one, the gateway would quietly fall back to the public, slower
path (and place handles with the default round trip): this fails instead, so the
version cap in pyproject.toml is raised only together with a fix.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from gateway.live import sdk


def test_every_fast_path_works_with_the_pinned_sdk() -> None:
    paths = sdk.probe()
    assert paths.socket, "AsyncSession no longer keeps its websocket in _ws"
    assert paths.converter, "the SDK's live message converter moved"
    assert paths.vertex_converter, "the SDK's Vertex AI live message converter moved"
    assert paths.fast and paths.describe().startswith("fast")
    assert paths.fast_on(vertex=True) and paths.fast_on(vertex=False)


def test_a_missing_converter_falls_back_on_its_backend_only() -> None:
    paths = sdk.SdkPaths(socket=True, converter=True, vertex_converter=False)
    assert paths.fast_on(vertex=False) and not paths.fast_on(vertex=True)
    assert not paths.fast and "Vertex converter" in paths.describe()


def test_the_path_is_logged_once_at_first_use(caplog: pytest.LogCaptureFixture) -> None:
    sdk._PATHS = None
    with caplog.at_level(logging.INFO, logger="gateway.live.sdk"):
        sdk.paths()
        sdk.paths()
    lines = [r.getMessage() for r in caplog.records if "live path" in r.getMessage()]
    assert lines == [f"google-genai live path: {sdk.paths().describe()}"]


def test_the_metric_names_the_path() -> None:
    from gateway.metrics import Metrics

    metrics = Metrics()
    metrics.replica.sdk_path.labels(path="fast").set(1)
    assert metrics.registry.get_sample_value("gateway_sdk_fast_path", {"path": "fast"}) == 1


async def test_a_message_is_stamped_when_it_reached_the_socket_not_when_it_was_read() -> None:
    """A handle is placed from when its message arrived: a reader that gets to it late
    (a busy event loop) must not make it look newer than it is."""
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import ServerConnection, serve

    async def speak(ws: ServerConnection) -> None:
        await ws.send(b"first")
        await ws.send(b"second")
        await ws.wait_closed()

    async with serve(speak, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", create_connection=sdk.TimedSocket) as ws:
            assert isinstance(ws, sdk.TimedSocket) and ws.opened_at is not None
            await asyncio.sleep(0.3)  # both messages arrive meanwhile; nobody reads
            read_at = time.monotonic()
            assert await ws.recv() == b"first"
            first = ws.received_at
            assert await ws.recv() == b"second"
            assert first is not None and ws.received_at is not None
            assert first <= ws.received_at <= read_at - 0.25
            # Written when sent: nothing of it waits in the transport.
            await ws.send(b"x" * 200_000)
            assert ws.transport.get_write_buffer_size() == 0
