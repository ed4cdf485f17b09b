"""The benchmark runs end to end (tiny: 2 calls, seconds) and prints every column; the fast
paths the benchmark led to say exactly what the SDK's slow paths say.

Speed is never asserted here: these machines are shared and noisy; the numbers are in
docs/benchmarks.md, from a full run.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from google import genai
from google.genai import types
from google.genai.live import AsyncSession

from gateway.live.sdk import INPUT_MIME, receive
from gateway.live.sdk import write_audio as send_audio
from gateway.testing.analysis import await_reply, heard_replies
from gateway.testing.harness import test_bed
from gateway.testing.live_emulator import EmulatorConfig, LiveEmulator
from gateway.testing.tls import TestTLS, make_tls

if TYPE_CHECKING:
    from conftest import Eventually

ROOT = Path(__file__).resolve().parent.parent
MODEL = "gemini-3.8-live"


def test_quick_benchmark_prints_the_whole_table(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out), "--logs", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    text = done.stdout
    header = next(line for line in text.splitlines() if line.startswith("| calls |"))
    for column in (
        "CPU core-s / call-min",
        "calls / core",
        "vs naive",
        "added ms caller→model p50 / p99",
        "added ms model→caller p50 / p99",
        "turn gap ms p50 / p99",
        "RSS MiB / call",
        "heard every reply",
    ):
        assert column in header
    lines = text.splitlines()
    main = lines[lines.index(header) : lines.index("", lines.index(header))]
    rows = [line for line in main if line.startswith("| 2 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["gateway", "naive"]
    # The gateway's GC pauses (its /metrics); the naive bridge has none to show.
    gc_header = next(line for line in lines if line.startswith("| calls | gateway | full coll"))
    gc_rows = lines[lines.index(gc_header) + 2 : lines.index("", lines.index(gc_header))]
    assert [row.split("|")[2].strip() for row in gc_rows] == ["gateway"], gc_rows
    full, young = (gc_rows[0].split("|")[i].strip() for i in (3, 6))
    assert full.isdigit() and young.isdigit(), gc_rows  # counted, if only zero in a short window
    gateway = [cell.strip() for cell in rows[0].split("|")[1:-1]]
    assert "× less" in gateway[4]  # the ratio to the naive baseline (flagged when saturated)
    assert all(cell not in ("", "nan") for cell in gateway)
    assert gateway[5] != "-" and gateway[6] != "-"  # the gateway's own latency histograms
    assert gateway[9] == "2/2", text  # both calls heard every reply
    for kind in ("goaway", "abrupt"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {kind} |"))
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        assert cells[1] == "2" and int(cells[2]) >= 2, row  # both calls' connections reset
    # The burst: both calls' streams opened at once, admitted and completed on both bridges.
    burst = [line.split("|") for line in lines if line.startswith("| 2 | ") and "/" in line]
    burst = [cells for cells in burst if len(cells) == 10]
    assert [cells[2].strip() for cells in burst] == ["gateway (MAX_CALLS = burst)", "naive"]
    assert all(cells[5].strip() == cells[6].strip() == "2/2" for cells in burst), burst
    assert burst[0][8].strip() != "-"  # how late the gateway read each start
    assert "caller 8k mu-law -> 16k PCM" in text and "model 24k PCM -> 8k mu-law" in text
    # The model's bill per call shape, both bridges; the gateway counted what was billed.
    cost = [line.split("|") for line in lines if line.startswith(("| short call", "| 0.5 min"))]
    assert [(c[1].strip(), c[2].strip()) for c in cost] == [
        (shape, bridge)
        for shape in ("short call", "0.5 min, talkative", "0.5 min, quiet")
        for bridge in ("gateway", "naive")
    ], text
    for cells in cost:
        heard, turns = cells[12].strip().split("/")
        assert heard == turns != "0", cells  # every reply heard whole
        assert cells[13].strip() == "0", cells  # the model got every caller turn whole
        assert float(cells[8].strip()) > 0, cells  # dollars per call-minute
    assert all(c[10].strip().startswith("= bill") for c in cost[::2]), cost
    # The doc's tables are printed again from the JSON, exactly as the run printed them.
    again = subprocess.run(
        [sys.executable, "-m", "bench.doc_tables", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout == text


def test_replicas_stage_reports_every_scenario(tmp_path: Path) -> None:
    """`python -m bench replicas` in small form (2 calls): a row per deploy step and per
    crash, each call on the replica counted once as survived or dropped, and the naive
    bridge's crash dropping every call on its killed process (it has nothing to go on with).
    Whether the gateway's calls survived is tests/test_replicas.py's to assert."""
    out = tmp_path / "replicas.json"
    command = ["replicas", "--calls", "2", "--warmup", "3", "--settle-s", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "bench", *command, "--json", str(out), "--logs", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode in (0, 1), done.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = [(r["bridge"], r["kind"]) for r in data["scenarios"]]
    assert rows == [("gateway", "deploy")] * 2 + [("gateway", "crash"), ("naive", "crash")]
    for row in data["scenarios"]:
        assert row["survived"] + row["dropped"] == row["calls"], row
    crash, naive = data["scenarios"][2:]
    assert crash["calls"] >= 1 and naive["calls"] >= 1  # the replica killed held a call
    assert naive["survived"] == 0 and naive["resumed"] == naive["fresh"] == 0
    assert all(row["exit_s"] is not None for row in data["scenarios"][:2])  # SIGTERM: exits
    assert (done.returncode == 0) == all(
        row["dropped"] == row["second_greetings"] == 0 for row in data["scenarios"][:3]
    )
    header = "| bridge | scenario | calls on it | survived | dropped | caller's gap ms"
    assert header in done.stdout, done.stdout
    again = subprocess.run(
        [sys.executable, "-m", "bench.doc_tables", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout == done.stdout


def test_doc_block_is_replaced_between_its_markers() -> None:
    from bench.doc_tables import replace_block

    text = "intro\n<!-- bench:main begin -->\nold\n<!-- bench:main end -->\nafter\n"
    new = replace_block(text, "main", ["| a |", "| b |"])
    assert (
        new
        == "intro\n<!-- bench:main begin -->\n\n| a |\n| b |\n\n<!-- bench:main end -->\nafter\n"
    )
    assert replace_block(new, "main", ["| a |", "| b |"]) == new  # idempotent
    with pytest.raises(ValueError):
        replace_block(text, "deflate", ["x"])  # no such block: nothing is written


# --- the gateway's fast Live paths against the SDK's own, through the emulator -----------


@pytest.fixture
async def emulator(tmp_path: Path) -> AsyncIterator[tuple[LiveEmulator, TestTLS]]:
    tls = make_tls(tmp_path)
    emu = LiveEmulator(EmulatorConfig(reply_s=0.3, response_delay_s=0.02, speed=2.0), tls)
    await emu.start()
    yield emu, tls
    await emu.stop()


def utterance() -> bytes:
    """0.3 s of a 440 Hz tone then 0.6 s of silence, 16 kHz PCM16: the emulator replies."""
    t = np.arange(int(16000 * 0.3)) / 16000
    speech = (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes()
    return speech + bytes(int(16000 * 0.6) * 2)


async def converse(
    emu: LiveEmulator, tls: TestTLS, fast: bool
) -> tuple[bytes, list[types.LiveServerMessage], bytes]:
    """Send an utterance in 20 ms pieces, read until the turn is complete.

    Returns (the audio the emulator holds, the non-audio messages, the reply's PCM).
    """
    options = types.HttpOptions(base_url=emu.base_url, async_client_args={"ssl": tls.client_ssl})
    client = genai.Client(api_key=emu.config.api_key, http_options=options)
    config = types.LiveConnectConfig(response_modalities=[types.Modality.AUDIO])
    sent = utterance()
    async with client.aio.live.connect(model=MODEL, config=config) as session:
        for i in range(0, len(sent), 640):
            piece = sent[i : i + 640]
            if fast:
                await send_audio(session, piece)
            else:
                blob = types.Blob(data=piece, mime_type=INPUT_MIME)
                await session.send_realtime_input(audio=blob)
        messages, audio = await asyncio.wait_for(read_turn(session, fast), 10)
    [record] = emu.record.sessions.values()
    return bytes(record.audio), messages, audio


async def read_turn(
    session: AsyncSession, fast: bool
) -> tuple[list[types.LiveServerMessage], bytes]:
    messages: list[types.LiveServerMessage] = []
    audio = bytearray()
    if fast:
        async for message in receive(session):
            if isinstance(message, list):
                audio += b"".join(message)
                continue
            audio += _audio_of(message)  # 3.x: audio and its transcript in one message
            messages.append(message)
            if message.server_content and message.server_content.turn_complete:
                break
        return messages, bytes(audio)
    async for message in session.receive():
        content = message.server_content
        parts = content.model_turn.parts if content and content.model_turn else None
        audio += _audio_of(message)
        if not (parts and _audio_only(message)):
            messages.append(message)
    return messages, bytes(audio)


def _audio_only(message: types.LiveServerMessage) -> bool:
    """Nothing but model audio (what the fast path yields as PCM chunks)."""
    dumped = message.model_dump(exclude_none=True)
    content = dumped.get("server_content", {})
    parts = content.get("model_turn", {}).get("parts", [])
    return (
        set(dumped) == {"server_content"}
        and set(content) == {"model_turn"}
        and all(set(p) == {"inline_data"} for p in parts)
    )


def _audio_of(message: types.LiveServerMessage) -> bytes:
    content = message.server_content
    parts = content.model_turn.parts if content and content.model_turn else None
    return b"".join(p.inline_data.data or b"" for p in parts or [] if p.inline_data)


async def test_fast_paths_carry_what_the_sdk_paths_carry(
    emulator: tuple[LiveEmulator, TestTLS],
) -> None:
    emu, tls = emulator
    held_slow, messages_slow, reply_slow = await converse(emu, tls, fast=False)
    emu.record.sessions.clear()
    held_fast, messages_fast, reply_fast = await converse(emu, tls, fast=True)
    # Caller audio arrives byte for byte, whichever way it was written.
    assert held_fast == held_slow == utterance()
    # The reply's audio, decoded without the SDK's models, is the SDK's, byte for byte;
    # every other message is the SDK's own object.
    assert len(reply_fast) == round(0.3 * 24000) * 2
    assert reply_fast == reply_slow
    assert [m.model_dump() for m in messages_fast] == [m.model_dump() for m in messages_slow]
    assert messages_fast[-1].server_content and messages_fast[-1].server_content.turn_complete


@pytest.mark.parametrize("batch_ms", [20, 40])
async def test_caller_audio_pieces_carry_every_turn(batch_ms: int, eventually: Eventually) -> None:
    """CALLER_AUDIO_BATCH_MS=40: half as many messages to the model as 20 (the default), every
    reply heard, and every frame's audio delivered (the last piece too, at hang-up)."""
    config = EmulatorConfig(reply_s=0.4, response_delay_s=0.05, end_of_speech_s=0.3, speed=2.0)
    async with test_bed(config, caller_audio_batch_ms=batch_ms) as bed:
        call = await bed.caller(speed=2.0).place_call()
        for n in (1, 2):
            await call.speak_tone(340.0, 0.6)
            # Heard, and its chunk played to its end: a hang-up cuts the chunk playing.
            await await_reply(call, n, min_s=0.35, limit_s=15.0)
        if len(call.record.sent_ulaw) // 160 % 2 == 0:  # an odd frame out: at 40 ms it waits
            await call.silence(0.02)  # for a partner that never comes, and is sent at hang-up
        await call.hangup()
        await eventually(lambda: not bed.metrics.registry.get_sample_value("gateway_calls_active"))
        [session] = bed.emulator.record.sessions.values()
        sample = bed.metrics.registry.get_sample_value
        frames = sample("gateway_caller_audio_frames_total") or 0
        pieces = sample("gateway_added_latency_seconds_count", {"direction": "caller_to_model"})
    assert [r.n for r in heard_replies(call.record) if r.duration_s > 0.35] == [1, 2]
    per_piece = batch_ms // 20
    assert frames > 50 and pieces is not None
    # Each piece is one message at most (the session may coalesce what queued up meanwhile).
    assert 0 < pieces <= frames / per_piece + 1
    # All the audio got there, but the resampler's 34 held samples (68 bytes).
    assert session.state.audio_bytes >= frames * 640 - 68
