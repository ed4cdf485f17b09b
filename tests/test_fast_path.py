"""The image runs the benchmark's fast path: what it needs is locked (hashed) as a runtime
dependency, and the gateway says at start which event loop it serves on; the Live client
offers permessage-deflate only when told to (LIVE_DEFLATE)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from gateway.testing.analysis import await_reply, heard_replies
from gateway.testing.harness import TestBed, free_port, quick_emulator, test_bed

ROOT = Path(__file__).resolve().parent.parent
# What python -m bench's best configuration runs with (docs/benchmarks.md).
FAST_PATH = ("uvloop", "orjson")
IMAGE = {"sys_platform": "linux", "python_version": "3.13", "platform_system": "Linux"}


def locked() -> dict[str, list[str]]:
    """Package -> its hashes, from requirements.lock."""
    pins: dict[str, list[str]] = {}
    name = ""
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line[0].isspace() and "==" in line:
            name = canonicalize_name(line.split("==", 1)[0])
            pins[name] = []
        elif line.strip().startswith("--hash=") and name:
            pins[name].append(line.strip().removeprefix("--hash=").rstrip(" \\"))
    return pins


def test_the_fast_path_is_locked_as_a_runtime_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {
        canonicalize_name(r.name)
        for r in map(Requirement, project["dependencies"])
        if r.marker is None or r.marker.evaluate(IMAGE)
    }
    pins = locked()
    for package in FAST_PATH:
        assert package in runtime, f"{package} is not a runtime dependency"
        assert pins.get(package), f"{package} is not in requirements.lock with hashes"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes -r requirements.lock" in dockerfile
    check = next(line for line in dockerfile.splitlines() if "python -I -c" in line)
    assert all(package in check for package in FAST_PATH)  # the build imports them


def test_the_gateway_logs_its_event_loop_at_start(tmp_path: Path) -> None:
    """Its event loop, and how many objects of its start it froze out of the collector's way."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT),
        "HOST": "127.0.0.1",
        "PORT": str(free_port()),
        "PUBLIC_URL": "https://gateway.example.test",
        "TWILIO_AUTH_TOKEN": "test-auth-token-0123456789abcdef",
        "GEMINI_API_KEY": "test-key",
        "GATEWAY_CONFIG": str(ROOT / "config" / "gateway.toml"),
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    messages: list[str] = []
    watchdog = threading.Timer(60, proc.kill)  # a gateway that never says it ends the read
    watchdog.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                messages.append(json.loads(line).get("msg", ""))
            if any(m.startswith("event loop:") for m in messages):
                break
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    loop = next((m for m in messages if m.startswith("event loop:")), None)
    assert loop is not None, (messages, rest)
    assert loop.startswith("event loop: uvloop "), loop  # installed here, as in the image
    frozen = next((m for m in messages if m.startswith("gc: ")), "")
    assert re.fullmatch(r"gc: \d+ objects of the started process frozen", frozen), messages
    assert int(frozen.split()[1]) > 10_000  # the modules and the SDK's types, at the least


# --- permessage-deflate: offered to the Live endpoint only when LIVE_DEFLATE says so --------


async def call_once(bed: TestBed) -> None:
    call = await bed.caller(speed=2.0).place_call()
    await call.speak_tone(350.0, 0.5)
    await await_reply(call, 1, min_s=0.5)
    await call.hangup()
    assert [r.n for r in heard_replies(call.record)] == [1]


@pytest.mark.parametrize("offer", [False, True])
async def test_deflate_is_offered_only_when_set(offer: bool) -> None:
    # The emulator accepts deflate when offered: so what is negotiated is what was offered.
    async with test_bed(quick_emulator(compress=True), live_deflate=offer) as bed:
        await call_once(bed)
        [connection] = bed.emulator.record.connections
        assert connection.compressed is offer


async def test_a_refusing_endpoint_gets_plain_frames_either_way() -> None:
    async with test_bed(quick_emulator(compress=False), live_deflate=True) as bed:
        await call_once(bed)
        [connection] = bed.emulator.record.connections
        assert connection.compressed is False
