"""Fixtures shared by the test files.

What a test needs from the gateway's side (emulator, gateway, simulated callers) is the test
bed, `gateway.testing`; what is here is about the tests themselves: the environment they
run in, tasks they leave behind, waiting for a condition.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

Eventually = Callable[..., Awaitable[None]]


@pytest.fixture
def no_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the settings a test gives: the repo's config/gateway.toml stays out of it."""
    monkeypatch.setenv("GATEWAY_CONFIG", str(tmp_path / "absent.toml"))


@pytest.fixture
def no_gemini_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Live endpoint from the developer's environment: only the test bed's."""
    monkeypatch.delenv("GOOGLE_GEMINI_BASE_URL", raising=False)


class NewTasks:
    """The asyncio tasks started since `mark()`: what a test must not leave behind."""

    def __init__(self) -> None:
        self._before: set[asyncio.Task[object]] = set()

    def mark(self) -> None:
        self._before = set(asyncio.all_tasks())

    async def left(self, limit_s: float = 5.0) -> set[str]:
        """Names of tasks alive that were not there at `mark()`, after a grace period."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        while True:
            extra = {t for t in asyncio.all_tasks() if t not in self._before and not t.done()}
            extra.discard(asyncio.current_task())  # type: ignore[arg-type]
            if not extra or loop.time() > deadline:
                return {t.get_name() for t in extra}
            await asyncio.sleep(0.05)


@pytest.fixture
def new_tasks() -> NewTasks:
    return NewTasks()


async def _eventually(predicate: Callable[[], object], limit_s: float = 10.0) -> None:
    """Wait until `predicate()` holds; fail the test if it never does within `limit_s`."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.02)


@pytest.fixture(scope="session")  # no state: module-scoped fixtures may use it too
def eventually() -> Eventually:
    return _eventually
