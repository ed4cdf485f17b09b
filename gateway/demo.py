"""`python -m gateway demo`: a whole call with no accounts and no network.

Starts the bundled Live API emulator (TLS, real google-genai SDK), the real
gateway and a simulated Twilio caller, then places a call of several turns,
time-compressed, across announced (goAway) and abrupt connection resets and
one barge-in. Prints a timeline and writes a stereo WAV (caller left, what the
caller heard right). Exits 0 only if every reply was heard, in order.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

from gateway.testing.analysis import await_reply, heard_replies, write_wav
from gateway.testing.harness import TestBed, test_bed
from gateway.testing.live_emulator import EmulatorConfig
from gateway.testing.twilio_sim import CallRecord, SimulatedCall

SPEED = 2.0  # time compression of the whole call
TURNS = 6
CALLER_TONES = (330.0, 370.0, 410.0, 350.0, 390.0, 430.0)


def _progress(text: str) -> None:
    sys.stderr.write(f"\r\033[K{text}")
    sys.stderr.flush()


async def _wait_reply(call: SimulatedCall, turn: int) -> None:
    """Keep the line open until reply `turn` was heard, then pause a moment."""
    await await_reply(call, turn, min_s=0.8, limit_s=20.0, step_s=0.2)
    await call.silence(0.3)


async def _barge_in(call: SimulatedCall, turn: int, freq: float) -> None:
    """Speak, wait until the reply starts, then talk over it."""
    await call.speak_tone(freq, 0.8)
    await await_reply(call, turn, min_s=0.0, limit_s=20.0)
    await call.silence(0.2)
    await call.speak_tone(freq, 0.4)  # the model stops, then answers this


async def _scripted_call(bed: TestBed) -> tuple[CallRecord, list[str]]:
    notes: list[str] = []
    caller = bed.caller(speed=SPEED)
    async with await caller.place_call() as call:
        turn = 0
        for i, freq in enumerate(CALLER_TONES[:TURNS]):
            turn += 1
            _progress(f"demo: turn {turn}/{TURNS + 1} ...")
            if i == 2:
                await _barge_in(call, turn, freq)
                turn += 1  # the cut reply is followed by the answer to the interruption
            else:
                if i == 4:
                    await bed.emulator.cut_all(abrupt=True)
                    notes.append("test: cut every Live connection abruptly (TCP reset)")
                await call.speak_tone(freq, 0.8)
            await _wait_reply(call, turn)
        await call.hangup()
        return call.record, notes


async def run_demo(out: str = "call.wav") -> int:
    """Run the demo call; 0 when the caller heard every reply in order."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = EmulatorConfig(
        lifetime=5.0,
        goaway_lead=1.5,
        handle_interval=0.5,
        reply_s=1.2,
        end_of_speech_s=0.4,
        response_delay_s=0.15,
        speed=SPEED,
    )
    started = time.monotonic()
    async with test_bed(config) as bed:
        record, notes = await _scripted_call(bed)
        await asyncio.sleep(0.2)
        emulator_events = list(bed.emulator.record.events)
    _progress("")
    replies = heard_replies(record)
    seconds = write_wav(record, Path(out))
    origin = next((t for t, kind, _ in record.events if kind == "start_tx"), started)

    print(f"Timeline (call time, compressed x{SPEED:.0f}):")
    lines: list[tuple[float, str]] = []
    for r in replies:
        lines.append((r.start_s, f"caller hears reply {r.n} ({r.duration_s:.2f} s)"))
    for t, kind, detail in emulator_events:
        if kind == "setup" and "resumed=True" in detail:
            lines.append(
                ((t - origin) * SPEED, f"live: session resumed on a new connection ({detail})")
            )
        elif kind in {"goaway", "interrupted", "refused"} or (
            kind == "close" and "abrupt" in detail
        ):
            lines.append(((t - origin) * SPEED, f"live: {kind} {detail}".rstrip()))
    for t, kind, _ in record.events:
        if kind == "clear":
            lines.append(((t - origin) * SPEED, "gateway sends Twilio clear (barge-in)"))
    for when, text in sorted(lines):
        print(f"  {when:7.2f} s  {text}")
    for note in notes:
        print(f"  {note}")

    expected = list(range(1, TURNS + 2))
    full = [r.n for r in replies if r.duration_s > 0.8]
    ok = full == [n for n in expected if n != 3]
    resets = sum(
        1
        for _, kind, detail in emulator_events
        if kind == "goaway" or (kind == "close" and "abrupt" in detail)
    )
    print(
        f"\n{len(replies)} replies heard, complete ones: {full}; "
        f"{resets} connection resets; wrote {out} ({seconds:.1f} s of audio); "
        f"took {time.monotonic() - started:.1f} s"
    )
    if not ok or resets < 2:
        print("demo FAILED: the caller did not hear every reply in order", file=sys.stderr)
        return 1
    print("demo OK")
    return 0
