"""The Live emulator in a process of its own, with a small HTTP control server.

The benchmark measures the gateway's process alone, so the emulator runs elsewhere; resets
are ordered through the control server (the emulator's cut/goAway live in its event loop):

* ``POST /cut``                  every open connection dies at once (TCP reset);
* ``POST /goaway?time_left=5``   every open connection gets ``goAway{timeLeft}`` and is closed
  (1011, as at the end of a real connection's life) when that time is up;
* ``GET /stats``                 connections opened so far, open now, resets ordered;
* ``GET /sessions``              per session: the caller audio its newest lineage holds
  (bytes) and the pitch of the first speech in it (with ``--audio-head-s``: how the soak
  tells whose call a session is), connections, whether it ended, and how many of its
  replies a text turn prompted (a greeting, not the caller's speech);
* ``GET /bills``                 per session: what the emulator billed it for
  (gateway.testing.billing: reports, tokens by kind, dollars), its caller audio, its model,
  the speech in each caller utterance it took as a turn;
* ``GET /chaos``                 the disruptions made so far (gateway.testing.chaos);
* ``POST /chaos?every=MIN,MAX``  random disruptions from now on, one every U(MIN, MAX) s over
  all connections (``every=off``: stop); ``--chaos-every`` starts them at once.

The service's behaviour is today's benchmark service unless told otherwise: setups answered at
once (``--setup-latency``), a second connection of a session accepted with its own state
(``--concurrent-resume``), no random disruptions (``--chaos-every``).

Started as ``python -m bench.emulator_server --dir DIR [--reply-s ...]``; prints one JSON line
(``base_url``, ``control_url``, ``ca_pem``, ``api_key``) when listening, runs until stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from bench.common import run
from gateway.testing.analysis import segments
from gateway.testing.chaos import KINDS, Chaos, ChaosConfig
from gateway.testing.live_emulator import (
    REASON_DEADLINE,
    EmulatorConfig,
    LiveEmulator,
    format_duration,
)
from gateway.testing.tls import make_tls

EMULATOR = web.AppKey("emulator", LiveEmulator)
CHAOS = web.AppKey("chaos", Chaos)


@dataclass
class ChaosRun:
    """The disruptions' task, if running: a holder set before the app starts (an aiohttp app's
    keys must not change once it runs)."""

    task: asyncio.Task[None] | None = None


CHAOS_RUN = web.AppKey("chaos_run", ChaosRun)


async def goaway_all(emulator: LiveEmulator, time_left: float) -> int:
    """Announce the end of every open connection, then end each when its time is up.

    The emulator's own goAway comes only at the end of a connection's configured lifetime;
    this gives every call the same, known reset instant. It reaches into the emulator's
    connection table (bench-only code; the emulator has no public goAway-now).
    """
    loop = asyncio.get_running_loop()
    count = 0
    for cid in emulator.open_connections():
        conn = emulator._conns.get(cid)
        if conn is None:
            continue
        emulator.record.event("goaway", f"conn={cid}")
        await conn.send({"goAway": {"timeLeft": format_duration(time_left)}})
        loop.call_later(time_left, conn.request_close, 1011, REASON_DEADLINE, "goaway")
        count += 1
    return count


async def _cut(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR]
    count = len(emulator.open_connections())
    await emulator.cut_all(abrupt=True)
    return web.json_response({"at": time.monotonic(), "connections": count})


async def _goaway(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR]
    time_left = float(request.query.get("time_left", "5"))
    at = time.monotonic()
    count = await goaway_all(emulator, time_left)
    return web.json_response({"at": at, "connections": count})


async def _stats(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR]
    return web.json_response(
        {
            "connections": len(emulator.record.connections),
            "open": len(emulator.open_connections()),
        }
    )


def first_pitch(head: bytes) -> float | None:
    """The pitch (Hz) of the first speech in 16 kHz PCM; None if there is none."""
    spoken = segments(np.frombuffer(head, dtype=np.int16), rate=16000)
    return spoken[0].freq_hz if spoken else None


async def _sessions(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR]
    found: list[dict[str, Any]] = [
        {
            "id": session.id,
            "audio_bytes": session.state.audio_bytes,
            "head_freq": first_pitch(bytes(session.state.audio)),
            "connections": len(session.connection_ids),
            "ended": session.ended_at is not None,
            "text_turns": sum(turn.trigger == "text" for turn in session.turns),
        }
        for session in emulator.record.sessions.values()
    ]
    return web.json_response(found)


async def _bills(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR]
    found: list[dict[str, Any]] = [
        {
            "id": session.id,
            "audio_s": session.state.audio_bytes / 32000,
            "context_tokens": session.state.context.tokens,  # what its model holds now
            "trimmed_tokens": session.state.context.trimmed,  # what compression dropped
            "connections": len(session.connection_ids),
            # seconds of speech in each caller utterance its model took as a turn
            "utterance_speech_s": [round(s, 3) for s in session.state.utterance_speech_s],
            **session.bill.summary(),
        }
        for session in emulator.record.sessions.values()
    ]
    return web.json_response(found)


async def _chaos(request: web.Request) -> web.Response:
    chaos = request.app.get(CHAOS)
    return web.json_response([asdict(d) for d in chaos.done] if chaos is not None else [])


async def _chaos_rate(request: web.Request) -> web.Response:
    """``POST /chaos?every=MIN,MAX`` starts the disruptions (or changes their rate);
    ``every=off`` stops them."""
    app = request.app
    every = request.query.get("every", "off")
    run = app[CHAOS_RUN]
    if every == "off":
        await _stop_chaos(run)
        return web.json_response({"running": False})
    chaos = app[CHAOS]
    chaos.config.every = pair(every)
    if run.task is None:
        run.task = asyncio.create_task(chaos.run())
    return web.json_response({"running": True, "every": list(chaos.config.every)})


async def _stop_chaos(run: ChaosRun) -> None:
    task, run.task = run.task, None
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def pair(text: str) -> tuple[float, float]:
    """``MIN,MAX`` (or one value for both)."""
    lo, _, hi = text.partition(",")
    return float(lo), float(hi or lo)


def interval(text: str) -> float | tuple[float, float]:
    """A value, or ``MIN,MAX`` drawn from each time."""
    return pair(text) if "," in text else float(text)


async def serve(args: argparse.Namespace) -> None:
    tls = make_tls(Path(args.dir))
    config = EmulatorConfig(
        reply_s=args.reply_s,
        end_of_speech_s=args.end_of_speech_s,
        response_delay_s=args.response_delay_s,
        lifetime=args.lifetime,
        handle_interval=args.handle_interval,
        record_audio=False,
        setup_latency=args.setup_latency,
        pong_delay=args.pong_delay,
        concurrent_resume=args.concurrent_resume,
        after_cut_reply=args.after_cut_reply,
        audio_head_bytes=int(args.audio_head_s * 32000),
        compress=args.deflate,
        seed=args.seed,
        speed=args.speed,
    )
    emulator = LiveEmulator(config, tls)
    await emulator.start()
    control = web.Application()
    control[EMULATOR] = emulator
    kinds = tuple(k for k in args.chaos_kinds.split(",") if k)
    every = args.chaos_every or (1.0, 1.0)
    control[CHAOS] = Chaos(emulator, ChaosConfig(every=every, kinds=kinds, seed=args.seed))
    control[CHAOS_RUN] = ChaosRun()
    if args.chaos_every is not None:
        control[CHAOS_RUN].task = asyncio.create_task(control[CHAOS].run())
    control.add_routes(
        [
            web.post("/cut", _cut),
            web.post("/goaway", _goaway),
            web.get("/stats", _stats),
            web.get("/sessions", _sessions),
            web.get("/bills", _bills),
            web.get("/chaos", _chaos),
            web.post("/chaos", _chaos_rate),
        ]
    )
    runner = web.AppRunner(control, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    info = {
        "base_url": emulator.base_url,
        "control_url": f"http://127.0.0.1:{port}",
        "ca_pem": tls.ca_pem_path,
        "api_key": config.api_key,
    }
    print(json.dumps(info), flush=True)
    # Run until the parent closes our stdin (or dies).
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    await _stop_chaos(control[CHAOS_RUN])
    await runner.cleanup()
    await emulator.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.emulator_server")
    parser.add_argument("--dir", required=True, help="where to write the CA (ca.pem)")
    parser.add_argument("--reply-s", type=float, default=0.8)
    parser.add_argument("--end-of-speech-s", type=float, default=0.5)
    parser.add_argument("--response-delay-s", type=float, default=0.2)
    parser.add_argument("--lifetime", type=float, default=3600.0)
    parser.add_argument(
        "--handle-interval", type=interval, default=1.0, help="seconds, or MIN,MAX (jittered)"
    )
    parser.add_argument("--deflate", action="store_true", help="accept permessage-deflate")
    parser.add_argument("--setup-latency", type=pair, default=(0.0, 0.0), help="MIN,MAX s")
    parser.add_argument(
        "--pong-delay", type=pair, default=(0.0, 0.0), help="MIN,MAX s before each pong"
    )
    parser.add_argument(
        "--concurrent-resume", choices=("fork", "takeover", "refuse"), default="fork"
    )
    parser.add_argument("--after-cut-reply", choices=("repeat", "wait"), default="repeat")
    parser.add_argument(
        "--audio-head-s", type=float, default=0.0, help="keep each session's first seconds"
    )
    parser.add_argument(
        "--chaos-every", type=pair, default=None, help="MIN,MAX s between random disruptions"
    )
    parser.add_argument("--chaos-kinds", default=",".join(KINDS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--speed", type=float, default=1.0, help="compress the model's pauses and replies"
    )
    args = parser.parse_args()
    run(serve(args))  # with uvloop when installed: the emulator is not what is measured


if __name__ == "__main__":
    main()
