"""The Live emulator in a process of its own, with a small HTTP control server.

The benchmark measures the gateway's process alone, so the emulator runs elsewhere; resets
are ordered through the control server (the emulator's cut/goAway live in its event loop):

* ``POST /cut``                  every open connection dies at once (TCP reset);
* ``POST /goaway?time_left=5``   every open connection gets ``goAway{timeLeft}`` and is closed
  (1011, as at the end of a real connection's life) when that time is up;
* ``GET /stats``                 connections opened so far, open now, resets ordered.

Started as ``python -m bench.emulator_server --dir DIR [--reply-s ...]``; prints one JSON line
(``base_url``, ``control_url``, ``ca_pem``, ``api_key``) when listening, runs until stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from aiohttp import web

from bench.common import run
from gateway.testing.live_emulator import (
    REASON_DEADLINE,
    EmulatorConfig,
    LiveEmulator,
    format_duration,
)
from gateway.testing.tls import make_tls

EMULATOR = web.AppKey("emulator", LiveEmulator)


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


async def serve(args: argparse.Namespace) -> None:
    tls = make_tls(Path(args.dir))
    config = EmulatorConfig(
        reply_s=args.reply_s,
        end_of_speech_s=args.end_of_speech_s,
        response_delay_s=args.response_delay_s,
        lifetime=args.lifetime,
        handle_interval=args.handle_interval,
        record_audio=False,
        # The benchmark's service as it was measured so far: setups answered at once, a
        # second connection of a session accepted (its own state).
        setup_latency=(0.0, 0.0),
        concurrent_resume="fork",
        compress=args.deflate,
    )
    emulator = LiveEmulator(config, tls)
    await emulator.start()
    control = web.Application()
    control[EMULATOR] = emulator
    control.add_routes(
        [web.post("/cut", _cut), web.post("/goaway", _goaway), web.get("/stats", _stats)]
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
    await runner.cleanup()
    await emulator.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.emulator_server")
    parser.add_argument("--dir", required=True, help="where to write the CA (ca.pem)")
    parser.add_argument("--reply-s", type=float, default=0.8)
    parser.add_argument("--end-of-speech-s", type=float, default=0.5)
    parser.add_argument("--response-delay-s", type=float, default=0.2)
    parser.add_argument("--lifetime", type=float, default=3600.0)
    parser.add_argument("--handle-interval", type=float, default=1.0)
    parser.add_argument("--deflate", action="store_true", help="accept permessage-deflate")
    args = parser.parse_args()
    run(serve(args))  # with uvloop when installed: the emulator is not what is measured


if __name__ == "__main__":
    main()
