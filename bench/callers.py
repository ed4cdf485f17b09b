"""Simulated callers in a process of their own: N concurrent calls talking in turns.

Each call says a 1 s tone, then keeps the line open (silence, as Twilio streams it) until the
reply has been heard to its end, pauses briefly and speaks again. Calls are placed at a steady
rate; once all are up and a warm-up has passed the process prints ``steady``, and ``end`` after
the measured window. Then each call finishes its turn, hangs up, and one ``result`` line tells,
per call, every turn's times (monotonic clock, shared by the processes of one machine) and
whether every reply was heard.

With ``--line-noise-db`` the quiet parts carry white noise at that level (dBFS RMS) instead
of digital silence, as a phone line does: audio then compresses as real calls do (matters
for permessage-deflate, not for the emulator's VAD, which ignores anything below -40 dB).

With ``--burst`` the calls come at once instead: every voice webhook is answered first, then
all the streams are opened at the same moment (as Twilio opens those of calls answered
together), and each call talks ``--turns`` turns; each call's result says when its upgrade was
sent and done, and whether its stream was refused.

Started as ``python -m bench.callers --url http://127.0.0.1:PORT --calls N ...``; writes JSON
lines on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import numpy as np

from bench.common import AUTH_TOKEN, PUBLIC_URL, run
from gateway.audio import pcm16_to_ulaw
from gateway.testing.analysis import heard_replies
from gateway.testing.twilio_sim import (
    SAMPLE_RATE,
    CallRecord,
    SimulatedCall,
    TwilioCallerSimulator,
)

TONE_HZ = 400.0
TONE_S = 1.0
PAUSE_S = 0.2  # after a reply, before speaking again
RUN_GAP_S = 0.1  # heard chunks further apart than this are separate renditions
STEP_S = 0.1
REPLY_TIMEOUT_S = 10.0


@dataclass
class Turn:
    """One exchange, in monotonic time: caller speech, then the reply as heard."""

    speech_start: float
    speech_end: float
    reply_start: float | None = None  # start of the rendition that was heard to its end
    reply_end: float | None = None


@dataclass
class CallResult:
    turns: list[Turn] = field(default_factory=list)
    heard: list[int] = field(default_factory=list)  # complete replies, in order heard
    heard_ok: bool = False
    error: str | None = None
    protocol_errors: int = 0
    upgrade_sent: float | None = None  # --burst: when its stream's upgrade went out
    upgraded: float | None = None  # and when the stream was upgraded (`connected` sent)
    close_code: int | None = None  # the gateway's close of the stream, if it closed it


class Quiet:
    """What a call sends while the caller says nothing: digital silence, or line noise."""

    def __init__(self, noise_db: float | None, seed: int) -> None:
        self.noise = b""
        self.at = 0
        if noise_db is not None:
            rng = np.random.default_rng(seed)
            level = 32768 * 10 ** (noise_db / 20)
            pcm = np.clip(rng.normal(0, level, 10 * SAMPLE_RATE), -32768, 32767)
            self.noise = pcm16_to_ulaw(pcm.astype("<i2").tobytes())

    async def send(self, call: SimulatedCall, seconds: float) -> None:
        if not self.noise:
            await call.silence(seconds)
            return
        n = round(seconds * SAMPLE_RATE)
        if self.at + n > len(self.noise):
            self.at = 0
        await call.send_audio(self.noise[self.at : self.at + n])
        self.at += n


@dataclass
class Window:
    """When new turns stop being started (set once every call is up)."""

    end_at: float = math.inf
    placed: int = 0


def complete_reply(
    record: CallRecord, first: int, min_bytes: int, now: float
) -> tuple[float, float] | None:
    """The first run of back-to-back heard audio since ``heard[first]`` that holds at least
    ``min_bytes`` and has finished playing, as (start, end); None if none yet."""
    start = end = -1.0
    size = 0
    for chunk in record.heard[first:]:
        if size and chunk.at - end > RUN_GAP_S:
            if size >= min_bytes:
                return start, end
            size = 0
        if size == 0:
            start = chunk.at
        size += len(chunk.ulaw)
        end = chunk.at + len(chunk.ulaw) / SAMPLE_RATE
    if size >= min_bytes and now - end > RUN_GAP_S:
        return start, end
    return None


async def await_reply(
    call: SimulatedCall, first: int, min_bytes: int, quiet: Quiet
) -> tuple[float, float] | None:
    """Stream silence until a whole reply has been heard (or the wait times out)."""
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while time.monotonic() < deadline and not call.closed:
        await quiet.send(call, STEP_S)
        found = complete_reply(call.record, first, min_bytes, time.monotonic())
        if found is not None:
            return found
    return None


async def talk(
    place: Callable[[], Awaitable[SimulatedCall]],
    window: Window,
    reply_s: float,
    turns: int | None,
    on_placed: asyncio.Event,
    quiet: Quiet,
) -> CallResult:
    result = CallResult()
    min_bytes = int(0.9 * reply_s * SAMPLE_RATE)
    try:
        call = await place()
    except Exception as exc:
        result.error = f"place_call: {type(exc).__name__}: {exc}"
        on_placed.set()
        return result
    on_placed.set()
    async with call:
        while (turns is None and time.monotonic() < window.end_at) or (
            turns is not None and len(result.turns) < turns
        ):
            first = len(call.record.heard)
            started = time.monotonic()
            await call.speak_tone(TONE_HZ, TONE_S)
            turn = Turn(started, time.monotonic())
            result.turns.append(turn)
            found = await await_reply(call, first, min_bytes, quiet)
            if found is None:
                result.error = "closed" if call.closed else f"reply {len(result.turns)} not heard"
                break
            turn.reply_start, turn.reply_end = found
            await quiet.send(call, PAUSE_S)
    record = call.record
    result.protocol_errors = len(record.protocol_errors)
    if record.closed_by == "gateway":
        result.close_code = record.close_code
    complete = [r.n for r in heard_replies(record) if r.duration_s >= 0.8 * reply_s]
    result.heard = [n for i, n in enumerate(complete) if i == 0 or complete[i - 1] != n]
    result.heard_ok = (
        result.error is None
        and result.protocol_errors == 0
        and result.heard == list(range(1, len(result.turns) + 1))
    )
    return result


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


async def burst(args: argparse.Namespace) -> None:
    """All calls answered, then all their streams opened at once; ``--turns`` turns each."""
    window = Window()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        sim = TwilioCallerSimulator(http, args.url, PUBLIC_URL, AUTH_TOKEN)
        answered = await asyncio.gather(*(sim.answer() for _ in range(args.calls)))
        emit("answered")

        async def one(record: CallRecord) -> CallResult:
            times: dict[str, float] = {}

            async def place() -> SimulatedCall:
                times["sent"] = time.monotonic()
                call = await sim.open_stream(record)
                # Open: upgraded, `connected` sent. Not when open_stream returns: it also waits
                # for the gateway to answer the stream-status callback, which Twilio sends on
                # its own while the stream goes on.
                times["open"] = max(t for t, kind, _ in record.events if kind == "connected_tx")
                return call

            quiet = Quiet(args.line_noise_db, seed=0)
            result = await talk(place, window, args.reply_s, args.turns, asyncio.Event(), quiet)
            result.upgrade_sent, result.upgraded = times.get("sent"), times.get("open")
            return result

        finished = await asyncio.gather(*(one(record) for record in answered))
    emit("result", calls=[asdict(r) for r in finished])


async def main(args: argparse.Namespace) -> None:
    if args.burst:
        await burst(args)
        return
    window = Window()
    interval = 1.0 / args.rate
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        sim = TwilioCallerSimulator(http, args.url, PUBLIC_URL, AUTH_TOKEN)
        tasks: list[asyncio.Task[CallResult]] = []
        placed: list[asyncio.Event] = []
        t0 = time.monotonic()
        for i in range(args.calls):
            delay = t0 + i * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            event = asyncio.Event()
            placed.append(event)
            quiet = Quiet(args.line_noise_db, seed=i)
            talking = talk(sim.place_call, window, args.reply_s, args.turns, event, quiet)
            tasks.append(asyncio.create_task(talking))
        for event in placed:
            await event.wait()
        emit("placed")
        if args.turns is None:
            await asyncio.sleep(args.warmup)
            emit("steady")
            window.end_at = time.monotonic() + args.seconds
            await asyncio.sleep(args.seconds)
            emit("end")
        results = await asyncio.gather(*tasks)
    emit("result", calls=[asdict(r) for r in results])


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.callers")
    parser.add_argument("--url", required=True, help="where the gateway listens (http://...)")
    parser.add_argument("--calls", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=30.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=3.0, help="after the last call is up")
    parser.add_argument("--rate", type=float, default=40.0, help="calls placed per second")
    parser.add_argument("--reply-s", type=float, default=0.8, help="the emulator's reply length")
    parser.add_argument("--turns", type=int, default=None, help="fixed turns, no window")
    parser.add_argument(
        "--burst", action="store_true", help="answer all calls, then open their streams at once"
    )
    parser.add_argument(
        "--line-noise-db", type=float, default=None, help="noise in the quiet parts (dBFS)"
    )
    run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
