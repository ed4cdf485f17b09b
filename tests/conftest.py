"""Fixtures shared by the test files.

What a test needs from the gateway's side (emulator, gateway, simulated callers) is the test
bed, `gateway.testing`; what is here is about the tests themselves: the environment they
run in, what was logged, tasks they leave behind, waiting for a condition.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest

from gateway.logs import LIBRARY_LEVELS, quiet_libraries
from gateway.testing import harness
from gateway.testing.redis_server import RedisMissing, RedisServer

Eventually = Callable[..., Awaitable[None]]


#: The Gemini API models a test marked ``per_profile`` runs against with
#: GATEWAY_TEST_PROFILES=all; by default (CI) the default model and those the marker names.
PROFILE_MODELS = (
    "gemini-3.8-live",
    "gemini-3.8-live-extended-thinking",
    "gemini-3.1-flash-live-preview",
    "gemini-2.5-flash-native-audio-preview-12-2025",
)


def pytest_configure(config: pytest.Config) -> None:
    _cap_address_space()
    config.addinivalue_line(
        "markers",
        "per_profile(*models): run against the default model and these (every profile in "
        "PROFILE_MODELS with GATEWAY_TEST_PROFILES=all); the test bed uses the model",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``per_profile`` once per model: the `live_model` fixture sets it."""
    marker = metafunc.definition.get_closest_marker("per_profile")
    if marker is None:
        return
    if os.environ.get("GATEWAY_TEST_PROFILES") == "all":
        models: tuple[str, ...] = PROFILE_MODELS
    else:
        models = tuple(dict.fromkeys((harness.DEFAULT_MODEL, *marker.args)))
    metafunc.parametrize("live_model", models, indirect=True, ids=[_short(m) for m in models])


def _short(model: str) -> str:
    return model.removeprefix("gemini-").replace("-live", "").replace("-preview", "")


@pytest.fixture(autouse=True)
def live_model(request: pytest.FixtureRequest) -> Iterator[str]:
    """The model every test bed of this test uses (its profile's behaviour in the emulator)."""
    model = getattr(request, "param", harness.DEFAULT_MODEL)
    harness.MODEL = model
    try:
        yield model
    finally:
        harness.MODEL = harness.DEFAULT_MODEL


#: A test process's address space: a test run away (a loop that never yields, appending to a
#: list) fails with MemoryError in that test, instead of taking the machine's memory until
#: the kernel kills a process, while every other test on the machine crawls (CI saw two
#: workers grow to 24 GB each and a neighbour's call stall for 15 minutes). A worker of the
#: suite maps under 1 GB.
TEST_PROCESS_ADDRESS_SPACE = 8 << 30


def _cap_address_space() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = (
        TEST_PROCESS_ADDRESS_SPACE
        if hard == resource.RLIM_INFINITY
        else min(TEST_PROCESS_ADDRESS_SPACE, hard)
    )
    if soft == resource.RLIM_INFINITY or soft > cap:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what the imports and the collection built (they live as long as the worker)
    out of the garbage collector's reach, as `python -m gateway` does after its start.

    Unfrozen, a full collection walked them all during whatever test was running: up to
    175 ms in a worker of the suite (timed with gc.callbacks), a stall of the one event loop
    that test's gateway, emulator and callers share (CI saw a reply heard as 0.26 s, a
    0.12-s stall, then 0.16 s).
    """
    gc.collect()
    gc.freeze()


@pytest.fixture
def no_config_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the settings a test gives: the repo's config/gateway.toml stays out of it."""
    monkeypatch.setenv("GATEWAY_CONFIG", "")  # empty: no file


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


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server for this test process (each xdist worker has its own), on a
    unix socket; a test that needs it fails, never skips, where none is installed."""
    try:
        server = RedisServer()
        server.start()
    except RedisMissing as missing:
        pytest.fail(str(missing), pytrace=False)
    try:
        yield server.url
    finally:
        server.stop()


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


class LogCapture(logging.Handler):
    """Every record logged while a test runs, and the checks the tests make on them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def texts(self) -> list[str]:
        """Each record as everything it carries: message, extra fields, traceback."""
        out = []
        plain = logging.Formatter()
        for record in self.records:
            extras = {k: v for k, v in record.__dict__.items() if k not in {"msg", "args"}}
            text = record.getMessage() + " " + repr(extras)
            if record.exc_info:
                text += plain.formatException(record.exc_info)
            out.append(text)
        return out

    def messages(self, logger: str, prefix: str) -> list[str]:
        """What `logger` logged that starts with `prefix`."""
        return [
            r.getMessage()
            for r in self.records
            if r.name == logger and r.getMessage().startswith(prefix)
        ]

    def warnings(self, prefix: str) -> list[str]:
        """Warnings, from any logger, that start with `prefix`."""
        return [
            r.getMessage()
            for r in self.records
            if r.levelno == logging.WARNING and r.getMessage().startswith(prefix)
        ]

    def at_least(self, level: int) -> list[str]:
        return [f"{r.name}: {r.getMessage()}" for r in self.records if r.levelno >= level]

    def assert_quiet(self) -> None:
        """Nothing at ERROR and no traceback above DEBUG (which production does not log):
        bad peers are warnings."""
        assert self.at_least(logging.ERROR) == []
        tracebacks = [r for r in self.records if r.exc_info and r.levelno > logging.DEBUG]
        assert [r.getMessage() for r in tracebacks] == []

    def assert_no_traceback_spam(self) -> None:
        gc.collect()  # "Task exception was never retrieved" is logged on collection
        noisy = [
            f"{r.name}: {r.getMessage()}"
            for r in self.records
            if r.exc_info
            or r.levelno >= logging.ERROR
            or "Error handling request" in r.getMessage()
            or "never retrieved" in r.getMessage()
        ]
        assert noisy == []


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    """Every record at DEBUG from every logger, with the library levels production sets."""
    root = logging.getLogger()
    saved_root = root.level
    saved = {name: logging.getLogger(name).level for name in LIBRARY_LEVELS}
    capture = LogCapture()
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    quiet_libraries()
    try:
        yield capture
    finally:
        root.removeHandler(capture)
        root.setLevel(saved_root)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
