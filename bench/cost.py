"""The model's bill per call-minute, for a few call shapes: the gateway against the naive bridge.

What a call costs its operator is the Live service's bill. The emulator bills each session as
the service is reported to (:mod:`gateway.testing.billing`: every turn reads the whole context
again, silence costs what speech costs), and ``GET /bills`` on its control server tells what
each session was billed. Here each bridge (the gateway, its ``--variant`` rows, the naive one)
takes the same calls of each shape, one shape at a time, in time compressed ``--cost-speed``
times (caller audio, the model's pauses and replies; the bill is in audio time, so it does not
change): a short call, and ten-minute calls with a talkative caller (long turns, short pauses)
and a quiet one (a short turn, then a long silence while the caller listens or looks something
up). The emulator's replies are ``REPLY_S`` long in this stage.

Per shape and bridge: billed tokens per call-minute (caller audio in, everything the turns
re-read, the model's audio out), dollars per call-minute at the emulator's price sheet, and
the gateway's own count (its ``gateway_live_tokens_total`` and ``gateway_live_cost_usd_total``
scraped at the end of the run) against the bill. Replies heard whole per call tell whether a
bridge got the same conversation for its money.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench.common import AUTH_TOKEN, PUBLIC_URL
from gateway.testing import billing
from gateway.testing.analysis import heard_replies
from gateway.testing.twilio_sim import TwilioCallerSimulator

REPLY_S = 3.0  # the emulator's replies in this stage: a bot's answer of a few seconds
# A caller turn reached the model whole when the utterance it took holds the turn's speech
# to within one 20 ms window at each end (where the codec and the resampler smear the edge).
WHOLE_SLACK_S = 0.04
TONE_HZ = 400.0


@dataclass(frozen=True)
class Shape:
    """A call: turns of ``speech_s`` of caller speech then ``listen_s`` of caller silence
    (the reply plays in it), for ``minutes`` of audio."""

    name: str
    minutes: float
    speech_s: float
    listen_s: float


def shapes(long_minutes: float) -> tuple[Shape, ...]:
    return (
        Shape("short call", 0.5, 2.0, 5.0),
        Shape(f"{long_minutes:g} min, talkative", long_minutes, 4.0, 5.0),
        Shape(f"{long_minutes:g} min, quiet", long_minutes, 1.5, 15.0),
    )


@dataclass
class CostRow:
    shape: str
    bridge: str
    model: str
    calls: int
    call_minutes: float
    replies: int  # turns the callers took
    heard: int  # replies heard whole
    whole: int  # caller turns whose speech the model got whole (one utterance, none of it cut)
    audio_s: float  # caller audio the sessions got
    context: tuple[int, int]  # tokens the sessions' models hold at the end, and trimmed
    bill: dict[str, int]  # tokens by kind, all the run's sessions
    cost_usd: float
    counted: dict[str, int] | None  # the gateway's own count (None: the naive bridge)
    counted_usd: float | None


async def one_call(sim: TwilioCallerSimulator, shape: Shape) -> tuple[int, int, float]:
    """(turns taken, replies heard whole, seconds of the call)."""
    call = await sim.place_call()
    turns = 0
    spent = 0.0
    async with call:
        while spent < shape.minutes * 60:
            await call.speak_tone(TONE_HZ, shape.speech_s)
            await call.silence(shape.listen_s)
            spent += shape.speech_s + shape.listen_s
            turns += 1
    # Replies heard whole (counted, not told apart by number: the emulator's pitches, which
    # number them, repeat after 50 replies).
    heard = sum(r.duration_s >= 0.9 * REPLY_S for r in heard_replies(call.record))
    return turns, heard, spent


async def bills(http: aiohttp.ClientSession, control_url: str) -> dict[str, dict[str, Any]]:
    async with http.get(control_url + "/bills") as resp:
        found: list[dict[str, Any]] = await resp.json()
    return {b["id"]: b for b in found}


def counted(text: str) -> tuple[dict[str, int], float]:
    """The gateway's tokens by kind and cost, from its /metrics."""
    tokens: dict[str, int] = {}
    cost = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_live_tokens_total":
                kind = f"{sample.labels['kind']}_{sample.labels['modality']}"
                tokens[kind] = tokens.get(kind, 0) + int(sample.value)
            elif sample.name == "gateway_live_cost_usd_total":
                cost += sample.value
    return tokens, cost


async def run_shape(
    start: Callable[[str], Awaitable[tuple[Any, str]]],
    impl: str,
    label: str,
    model: str,
    shape: Shape,
    calls: int,
    speed: float,
    http: aiohttp.ClientSession,
    control_url: str,
) -> CostRow:
    """``calls`` calls of ``shape`` through a fresh ``impl`` process; what they were billed."""
    before = await bills(http, control_url)
    proc, url = await start(impl)
    try:
        sim = TwilioCallerSimulator(http, url, PUBLIC_URL, AUTH_TOKEN, speed=speed)
        results = await asyncio.gather(*(one_call(sim, shape) for _ in range(calls)))
        await asyncio.sleep(1.0)  # the last turns' reports
        metrics = None
        if impl != "naive":
            async with http.get(url + "/metrics") as resp:
                metrics = counted(await resp.text())
    finally:
        await proc.stop()
    after = await bills(http, control_url)
    tokens: dict[str, int] = {}
    cost = audio_s = 0.0
    kept = trimmed = whole = 0
    for sid, bill in after.items():
        if sid in before:
            continue
        whole += sum(s >= shape.speech_s - WHOLE_SLACK_S for s in bill["utterance_speech_s"])
        cost += bill["cost_usd"]
        audio_s += bill["audio_s"]
        kept += bill["context_tokens"]
        trimmed += bill["trimmed_tokens"]
        for kind, n in bill["tokens"].items():
            tokens[kind] = tokens.get(kind, 0) + n
    return CostRow(
        shape=shape.name,
        bridge=label,
        model=model,
        calls=calls,
        call_minutes=sum(s for _, _, s in results) / 60,
        replies=sum(t for t, _, _ in results),
        heard=sum(h for _, h, _ in results),
        whole=whole,
        audio_s=audio_s,
        context=(kept, trimmed),
        bill=tokens,
        cost_usd=cost,
        counted=metrics[0] if metrics else None,
        counted_usd=metrics[1] if metrics else None,
    )


def gateway_settings(speed: float, model: str) -> list[str]:
    """What a bridge needs for compressed time, and the prices the emulator bills at (the
    gateway then counts dollars too)."""
    prices = dict(billing.profile_for(model).prices)
    return [
        f"CALLER_AUDIO_RATE={max(1.0, 2 * speed)}",
        f"CALLER_SEND_BUFFER_S={max(120.0, 60 * speed)}",
        f"GEMINI_MODEL={model}",
        f"TOKEN_PRICES={json.dumps(prices, separators=(',', ':'))}",
    ]


def table(rows: list[dict[str, Any]]) -> list[str]:
    """Per shape (and model, when the run had several), each bridge's bill per call-minute
    and the gateway's count of it."""
    header = (
        "| call shape | bridge | call-min | caller audio sent s/min | prompt tok/min "
        "| model audio tok/min | billed tok/min | $ / call-min | billed vs naive "
        "| gateway's count | context held at the end | replies heard "
        "| caller turns lost or cut |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    several = len({r.get("model") for r in rows}) > 1

    def shape_of(r: dict[str, Any]) -> str:
        return f"{r['shape']}, {r['model']}" if several else str(r["shape"])

    naive = {shape_of(r): r for r in rows if r["bridge"] == "naive"}
    for r in rows:
        minutes = r["call_minutes"]
        bill = r["bill"]
        total = sum(bill.values())
        prompt = bill.get("prompt_audio", 0) + bill.get("prompt_text", 0)
        vs = "-"
        base = naive.get(shape_of(r))
        if r["bridge"] != "naive" and base is not None and sum(base["bill"].values()):
            saved = 1 - total / sum(base["bill"].values())
            vs = f"{100 * saved:.0f} % fewer" if saved >= 0 else f"{-100 * saved:.0f} % more"
        kept, trimmed = r["context"]
        # what the model did not get whole of the callers' turns (target 0); "-" for a
        # run from before the emulator reported it
        lost = "-" if "whole" not in r else str(max(r["replies"] - r["whole"], 0))
        held = f"{kept} tok ({100 * kept / max(kept + trimmed, 1):.0f} %)"
        if r["counted"] is None:
            count = "-"
        elif r["counted"] == bill:
            count = f"= bill (${r['counted_usd']:.4f})"
        else:
            count = f"differs: {r['counted']} (${r['counted_usd']:.4f})"
        lines.append(
            f"| {shape_of(r)} | {r['bridge']} | {minutes:.2f} | {r['audio_s'] / minutes:.1f} "
            f"| {prompt / minutes:.0f} | {bill.get('response_audio', 0) / minutes:.0f} "
            f"| {total / minutes:.0f} | {r['cost_usd'] / minutes:.4f} | {vs} | {count} "
            f"| {held} | {r['heard']}/{r['replies']} | {lost} |"
        )
    return lines


def cost_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cost-calls", type=int, default=2, help="calls per shape and bridge (0: no cost stage)"
    )
    parser.add_argument("--cost-minutes", type=float, default=10.0, help="the long calls")
    parser.add_argument("--cost-speed", type=float, default=10.0, help="time compression")
    parser.add_argument(
        "--cost-model",
        default="gemini-3.8-live",
        help="GEMINI_MODEL, or a comma list: every shape on each model (its billing profile)",
    )


async def stage(args: argparse.Namespace, logs: Path, tmp: Path) -> list[dict[str, Any]]:
    """Every shape through every bridge of the run, against an emulator of its own (its
    replies REPLY_S long, time compressed); the rows for the table."""
    from bench.__main__ import Bench, label, log, spawn

    await asyncio.to_thread(tmp.mkdir, parents=True, exist_ok=True)
    argv = ["-m", "bench.emulator_server", "--dir", str(tmp), "--reply-s", str(REPLY_S)]
    argv += ["--end-of-speech-s", str(args.end_of_speech_s)]
    argv += ["--response-delay-s", str(args.response_delay_s), "--speed", str(args.cost_speed)]
    emulator = await spawn("cost-emulator", argv, {}, logs, args.nice)
    rows: list[dict[str, Any]] = []
    try:
        info = await emulator.line(limit_s=30)
        impls = ["gateway", *(f"variant:{i}" for i in range(len(args.variant)))]
        impls += [f"before:{i}" for i in range(len(args.baseline))]
        impls += [] if args.no_naive else ["naive"]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            for model in [m.strip() for m in args.cost_model.split(",") if m.strip()]:
                settings = copy.copy(args)
                settings.gateway_env = [
                    *args.gateway_env,
                    *gateway_settings(args.cost_speed, model),
                ]
                bench = Bench(settings, emulator, info, http, logs)
                for shape in shapes(args.cost_minutes):
                    for impl in impls:
                        log(f"cost: {impl}, {model}, {args.cost_calls} x {shape.name} ...")
                        row = await run_shape(
                            bench.start_gateway,
                            impl,
                            label(impl, args),
                            model,
                            shape,
                            args.cost_calls,
                            args.cost_speed,
                            http,
                            info["control_url"],
                        )
                        rows.append(asdict(row))
    finally:
        await emulator.stop()
    return rows
