"""`python -m bench soak`: many calls for many minutes under random announced and abrupt cuts.

Is any caller audio lost, any reply not heard, does anything in the gateway grow? Processes,
as in ``python -m bench``: the Live emulator (``bench.emulator_server``) playing a service
whose setups take 0.2-1.5 s, whose handles come every few hundred ms and which refuses a
second connection of a session (the public record; ``--concurrent-resume`` to change it), with
random disruptions of every kind (``gateway.testing.chaos``: goAway with any time left, TCP
resets, close codes, cuts during a setup, mid-reply, right after a handle, twice in a row, a
refused handshake); the gateway, started as an operator starts it (``python -m gateway``); the
callers, in this process.

Each call talks in turns: a 1 s tone at a pitch of its own (so that the emulator's session can
be told whose it is), then the line kept open until the reply was heard in full, a pause, the
next turn. Calls are added ``--ramp-step`` at a time up to ``--calls``, and the ramp stops
early if the machine gets busier than ``--max-busy`` (all processes, this machine's cores):
the report says how many ran and why. Then the window of ``--minutes`` begins, with one
disruption every ``--cut-every`` seconds per call on average.

Figures:

* caller audio: per call, what it sent (as 16 kHz PCM) against what its session's newest
  lineage holds at the end (the emulator's control server); lost = sent - held, counted for a
  call when over ``--tolerance-s`` (the tail still in the gateway at the hang-up);
* replies: every call heard every reply in full, once, in order;
* the caller's gap per cause: from the end of the caller's speech to the start of the reply as
  heard in full, per turn, by the disruption that hit the turn (the first one between its
  speech and its reply; ``none`` for the others): p50 / p99 / max;
* the gateway process when idle before the calls, at the window's start, at its end and idle
  after the calls: RSS, open file descriptors, sockets, threads. The gateway exposes no count
  of its asyncio tasks, and nothing outside its process can count them: not measured.

Run: ``python -m bench soak`` (100 calls, 10 minutes); ``python -m bench soak --calls 10
--minutes 1`` for a short one; ``--pong-delay 25,25`` for a service whose pongs come 25 s late
(the gateway's liveness must not cut its connections, nor its handle placement lose input).
Exit status 1 if any caller audio was lost or a reply not heard.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench.__main__ import Proc, emulator_server, machine_busy, spawn, wait_healthy
from bench.callers import complete_reply
from bench.common import AUTH_TOKEN, PUBLIC_URL, cpu_seconds, gateway_env, rss_bytes
from bench.common import run as run_loop
from gateway.testing.analysis import heard_replies
from gateway.testing.harness import free_port
from gateway.testing.twilio_sim import SAMPLE_RATE, SimulatedCall, TwilioCallerSimulator

TONE_S = 1.0
PAUSE_S = 0.3
STEP_S = 0.1
REPLY_PITCHES = 50  # gateway.testing.live_emulator.reply_freq cycles through 50 pitches
REPLY_TIMEOUT_S = 20.0  # a reply not heard by then is lost (the call talks on)
GAPPED_QUIET_S = 0.5  # a reply heard in pieces counts once nothing more came for this long
BASE_HZ = 250.0
STEP_HZ = 7.0  # between two calls' pitches: far more than the analysis' resolution
MATCH_HZ = 3.0
BUSY_PROBE_S = 3.0
MIB = 1024 * 1024
PCM_PER_ULAW = 4  # one 8 kHz mu-law byte is two 16-bit samples at 16 kHz


def pitch(i: int) -> float:
    return BASE_HZ + STEP_HZ * i


# --- the gateway process ------------------------------------------------------------------


def process_point(pid: int) -> dict[str, int]:
    """RSS, open file descriptors, sockets among them, threads of a process."""
    fds = os.listdir(f"/proc/{pid}/fd")
    sockets = 0
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                sockets += 1
        except OSError:
            pass  # closed meanwhile
    threads = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                threads = int(line.split()[1])
    return {"rss": rss_bytes(pid), "fds": len(fds), "sockets": sockets, "threads": threads}


def metric_samples(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """``name{label=value}`` -> value for the samples of the named metrics."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.removesuffix("_total") in names or sample.name in names:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


METRICS = (
    "gateway_live_resumptions",
    "gateway_live_switches",
    "gateway_caller_audio_dropped_seconds",
    "gateway_calls",
    "gateway_live_errors",
)


# --- calls --------------------------------------------------------------------------------


@dataclass
class Turn:
    speech_start: float
    speech_end: float
    reply_start: float | None = None
    reply_end: float | None = None
    gapped: bool = False  # heard whole, but with a gap in it (playback ran dry)


@dataclass
class CallResult:
    index: int
    pitch: float
    turns: list[Turn] = field(default_factory=list)
    sent_bytes: int = 0  # 16 kHz PCM
    heard: list[int] = field(default_factory=list)  # replies heard in full, in order
    error: str | None = None

    @property
    def heard_ok(self) -> bool:
        """Every turn got a reply, and the replies came in order.

        The emulator numbers a reply by the model turns its session's state holds (pitches
        repeat every REPLY_PITCHES), so a reply interrupted or cut by a reset, or a repeat
        the gateway did not play, moves the numbers on: in order means each whole reply's
        number is one to three past the one before, never the same or lower."""
        steps = [(b - a) % REPLY_PITCHES for a, b in itertools.pairwise(self.heard)]
        return self.error is None and all(1 <= k <= 3 for k in steps)

    @property
    def gapped(self) -> int:
        return sum(t.gapped for t in self.turns)


@dataclass
class Window:
    end_at: float = math.inf


async def await_reply(
    call: SimulatedCall, first: int, min_bytes: int, timeout_s: float = REPLY_TIMEOUT_S
) -> tuple[float, float, bool] | None:
    """Keep the line open until a whole reply was heard: its (start, end, gapped); None if
    none came within ``timeout_s``. Gapped: no one unbroken run held the whole reply,
    but the runs since the turn add up to it and nothing more came for GAPPED_QUIET_S (a
    reply heard with the line's playback running dry in it, e.g. on a busy machine)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not call.closed:
        await call.silence(STEP_S)
        now = time.monotonic()
        found = complete_reply(call.record, first, min_bytes, now)
        if found is not None:
            return (*found, False)
        heard = call.record.heard[first:]
        if heard and sum(len(c.ulaw) for c in heard) >= min_bytes:
            end = heard[-1].at + len(heard[-1].ulaw) / SAMPLE_RATE
            if now - end > GAPPED_QUIET_S:
                return heard[0].at, end, True
    return None


async def talk(
    sim: TwilioCallerSimulator, index: int, window: Window, reply_s: float
) -> CallResult:
    result = CallResult(index, pitch(index))
    min_bytes = int(0.9 * reply_s * SAMPLE_RATE)
    try:
        call = await sim.place_call()
    except Exception as exc:
        result.error = f"place_call: {type(exc).__name__}: {exc}"
        return result
    async with call:
        while time.monotonic() < window.end_at and not call.closed:
            first = len(call.record.heard)
            turn = Turn(time.monotonic(), 0.0)
            await call.speak_tone(result.pitch, TONE_S)
            turn.speech_end = time.monotonic()
            result.turns.append(turn)
            found = await await_reply(call, first, min_bytes)
            if found is None:
                if result.error is None:
                    result.error = "closed" if call.closed else f"reply {len(result.turns)} lost"
                continue
            turn.reply_start, turn.reply_end, turn.gapped = found
            await call.silence(PAUSE_S)
    finish(result, call, reply_s)
    return result


def finish(result: CallResult, call: SimulatedCall, reply_s: float) -> None:
    record = call.record
    result.sent_bytes = len(record.sent_ulaw) * PCM_PER_ULAW
    complete = [r.n for r in heard_replies(record) if r.duration_s >= 0.8 * reply_s]
    result.heard = [n for i, n in enumerate(complete) if i == 0 or complete[i - 1] != n]


# --- analysis -----------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass
class Report:
    calls: int
    minutes: float
    ramp: str
    results: list[CallResult]
    sessions: list[dict[str, Any]]
    disruptions: list[dict[str, Any]]
    points: dict[str, dict[str, int]]
    busy: float
    own_busy: float
    metrics: dict[str, float]
    tolerance_s: float
    audio: dict[int, dict[str, Any]] = field(default_factory=dict)
    unmatched_sessions: int = 0

    def match(self) -> None:
        """Each call's sessions by the pitch of the first speech they hold."""
        by_call: dict[int, list[dict[str, Any]]] = {}
        for session in self.sessions:
            freq = float(session.get("head_freq") or 0.0)  # None: no speech in it
            index = round((freq - BASE_HZ) / STEP_HZ)
            if not 0 <= index < len(self.results) or abs(freq - pitch(index)) > MATCH_HZ:
                self.unmatched_sessions += 1
                continue
            by_call.setdefault(index, []).append(session)
        for r in self.results:
            mine = by_call.get(r.index, [])
            held = mine[-1]["audio_bytes"] if mine else 0
            lost_s = max(0, r.sent_bytes - held) / (2 * 16000)
            extra_s = max(0, held - r.sent_bytes) / (2 * 16000)
            self.audio[r.index] = {
                "sessions": [s["id"] for s in mine],
                "sent_s": r.sent_bytes / 32000,
                "held_s": held / 32000,
                "lost_s": lost_s,
                "extra_s": extra_s,
            }

    def calls_losing(self) -> list[int]:
        return [i for i, a in self.audio.items() if a["lost_s"] > self.tolerance_s]

    def gaps(self) -> dict[str, list[float]]:
        """Per cause, the caller's wait for each turn's reply (s)."""
        by_session: dict[str, list[dict[str, Any]]] = {}
        for d in self.disruptions:
            by_session.setdefault(d["session_id"], []).append(d)
        found: dict[str, list[float]] = {}
        for r in self.results:
            mine = sorted(
                (d for s in self.audio[r.index]["sessions"] for d in by_session.get(s, [])),
                key=lambda d: float(d["at"]),
            )
            for t in r.turns:
                if t.reply_start is None:
                    continue
                hit = [d for d in mine if t.speech_start <= d["at"] <= t.reply_start]
                cause = hit[0]["kind"] if hit else "none"
                found.setdefault(cause, []).append(t.reply_start - t.speech_end)
        return found

    @property
    def ok(self) -> bool:
        return (
            not self.calls_losing()
            and all(r.heard_ok for r in self.results)
            and self.unmatched_sessions == 0
        )

    def lines(self) -> list[str]:
        turns = sum(len(r.turns) for r in self.results)
        heard = sum(r.heard_ok for r in self.results)
        unanswered = sum(t.reply_start is None for r in self.results for t in r.turns)
        gapped = sum(r.gapped for r in self.results)
        sent = sum(a["sent_s"] for a in self.audio.values())
        held = sum(a["held_s"] for a in self.audio.values())
        lost = sum(a["lost_s"] for a in self.audio.values())
        extra = sum(a["extra_s"] for a in self.audio.values())
        losing = self.calls_losing()
        worst = max((a["lost_s"] for a in self.audio.values()), default=0.0)
        out = [
            f"calls: {self.calls} ({self.ramp}); window {self.minutes:g} min; machine busy "
            f"{100 * self.busy:.0f} % (this soak's processes {100 * self.own_busy:.0f} %)",
            "",
            "| calls | turns | disruptions | every reply heard, in order | turns without a reply "
            "| replies heard with a gap | caller audio sent s | held s "
            "| lost s (calls over tolerance) | worst call lost s | held twice s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {self.calls} | {turns} | {len(self.disruptions)} | {heard}/{len(self.results)} "
            f"| {unanswered} | {gapped} "
            f"| {sent:.1f} | {held:.1f} | {lost:.2f} ({len(losing)}) | {worst:.2f} "
            f"| {extra:.2f} |",
            "",
            "| cause | turns | caller's gap ms p50 | p99 | max |",
            "|---|---|---|---|---|",
        ]
        for cause, values in sorted(self.gaps().items(), key=lambda kv: kv[0] != "none"):
            ms = [1000 * v for v in values]
            out.append(
                f"| {cause} | {len(ms)} | {percentile(ms, 0.5):.0f} | {percentile(ms, 0.99):.0f} "
                f"| {max(ms):.0f} |"
            )
        out += [
            "",
            "| gateway | RSS MiB | open fds | sockets | threads | asyncio tasks |",
            "|---|---|---|---|---|---|",
        ]
        for name, p in self.points.items():
            out.append(
                f"| {name} | {p['rss'] / MIB:.1f} | {p['fds']} | {p['sockets']} "
                f"| {p['threads']} | not measurable |"
            )
        out += ["", "gateway metrics at the end:"]
        out += [f"  {k} {v:g}" for k, v in sorted(self.metrics.items()) if v]
        if self.unmatched_sessions:
            out.append(f"sessions not matched to a call: {self.unmatched_sessions}")
        for r in self.results:
            if not r.heard_ok:
                out.append(f"call {r.index}: {r.error or 'replies heard'} {r.heard[-5:]}")
        for i in losing:
            out.append(f"call {i}: lost {self.audio[i]['lost_s']:.2f} s ({self.audio[i]})")
        out.append("verdict: " + ("OK" if self.ok else "FAILED"))
        return out


# --- the run ------------------------------------------------------------------------------


class Busy:
    """Machine-wide and own CPU use between two marks."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.mark()

    def mark(self) -> None:
        self.at = time.monotonic()
        self.busy, self.total = machine_busy()
        self.cpu = sum(cpu_seconds(p) for p in self.pids)

    def since(self) -> tuple[float, float]:
        busy, total = machine_busy()
        cores = os.cpu_count() or 1
        seconds = max(time.monotonic() - self.at, 1e-6)
        own = (sum(cpu_seconds(p) for p in self.pids) - self.cpu) / seconds / cores
        return (busy - self.busy) / max(total - self.total, 1), own


async def soak(args: argparse.Namespace) -> Report:
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        logs = Path(args.logs) if args.logs else Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        options = [
            "--reply-s",
            str(args.reply_s),
            "--setup-latency",
            args.setup_latency,
            "--pong-delay",
            args.pong_delay,
            "--handle-interval",
            args.handle_interval,
            "--concurrent-resume",
            args.concurrent_resume,
            "--after-cut-reply",
            args.after_cut_reply,
            "--audio-head-s",
            "3",
            "--seed",
            str(args.seed),
        ]
        gateway: Proc | None = None
        async with emulator_server(tmp, logs, options) as (emulator, info):
            try:
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
                    port = free_port()
                    env = gateway_env(info, port, os.environ.get("SOAK_LOG_LEVEL", "WARNING"))
                    # Sent against held per call: every frame must reach the model, so the
                    # caller's silence is sent too (gateway.dtx withholds it by default).
                    env["SILENCE_SUPPRESSION"] = "false"
                    gateway = await spawn("gateway", ["-m", "gateway"], env, logs)
                    url = f"http://127.0.0.1:{port}"
                    await wait_healthy(http, url, gateway)
                    return await drive(args, http, url, gateway, emulator, info["control_url"])
            finally:
                if gateway is not None:
                    await gateway.stop()


async def drive(
    args: argparse.Namespace,
    http: aiohttp.ClientSession,
    url: str,
    gateway: Proc,
    emulator: Proc,
    control: str,
) -> Report:
    points = {"idle before": process_point(gateway.pid)}
    busy = Busy([gateway.pid, emulator.pid, os.getpid()])
    window = Window()
    sim = TwilioCallerSimulator(http, url, PUBLIC_URL, AUTH_TOKEN)
    tasks: list[asyncio.Task[CallResult]] = []
    ramp = f"ramped to --calls {args.calls}"
    while len(tasks) < args.calls:
        for _ in range(min(args.ramp_step, args.calls - len(tasks))):
            tasks.append(asyncio.create_task(talk(sim, len(tasks), window, args.reply_s)))
            await asyncio.sleep(1.0 / args.rate)
        log(f"{len(tasks)} calls up ...")
        await asyncio.sleep(2.0)  # their first turns
        busy.mark()
        await asyncio.sleep(BUSY_PROBE_S)
        machine, _ = busy.since()
        if machine > args.max_busy and len(tasks) < args.calls:
            ramp = (
                f"ramp stopped at {len(tasks)} of {args.calls}: machine {100 * machine:.0f} % "
                f"busy > {100 * args.max_busy:.0f} %"
            )
            break
    calls = len(tasks)
    lo, hi = (float(v) for v in args.cut_every.split(","))
    every = f"{lo / calls},{hi / calls}"  # over all connections: per call U(lo, hi) on average
    async with http.post(f"{control}/chaos", params={"every": every}) as resp:
        resp.raise_for_status()
    points["start"] = process_point(gateway.pid)
    busy.mark()
    log(f"{calls} calls for {args.minutes:g} min under random disruptions ...")
    window.end_at = time.monotonic() + 60 * args.minutes
    await asyncio.sleep(60 * args.minutes)
    machine, own = busy.since()
    points["end"] = process_point(gateway.pid)
    async with http.post(f"{control}/chaos", params={"every": "off"}) as resp:
        resp.raise_for_status()
    results = list(await asyncio.gather(*tasks))
    await asyncio.sleep(args.settle_s)
    points["idle after"] = process_point(gateway.pid)
    async with http.get(f"{control}/sessions") as resp:
        sessions = await resp.json()
    async with http.get(f"{control}/chaos") as resp:
        disruptions = await resp.json()
    async with http.get(url + "/metrics") as resp:
        metrics = metric_samples(await resp.text(), METRICS)
    report = Report(
        calls=calls,
        minutes=args.minutes,
        ramp=ramp,
        results=results,
        sessions=sessions,
        disruptions=disruptions,
        points=points,
        busy=machine,
        own_busy=own,
        metrics=metrics,
        tolerance_s=args.tolerance_s,
    )
    report.match()
    return report


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__)
    parser.add_argument("--calls", type=int, default=100, help="concurrent calls, at most")
    parser.add_argument("--minutes", type=float, default=10.0, help="the window")
    parser.add_argument("--ramp-step", type=int, default=10, help="calls added at a time")
    parser.add_argument("--rate", type=float, default=20.0, help="calls placed per second")
    parser.add_argument("--max-busy", type=float, default=0.7, help="machine busy, 0-1")
    parser.add_argument(
        "--cut-every", default="20,40", help="MIN,MAX s between two disruptions of one call"
    )
    parser.add_argument("--setup-latency", default="0.2,1.5", help="MIN,MAX s")
    parser.add_argument(
        "--pong-delay", default="0,0", help="MIN,MAX s before each pong (the service: 8-30 s)"
    )
    parser.add_argument("--handle-interval", default="0.2,1.0", help="MIN,MAX s")
    parser.add_argument(
        "--concurrent-resume", choices=("fork", "takeover", "refuse"), default="refuse"
    )
    parser.add_argument("--after-cut-reply", choices=("repeat", "wait"), default="repeat")
    parser.add_argument("--reply-s", type=float, default=0.8)
    parser.add_argument(
        "--tolerance-s", type=float, default=0.1, help="audio a call may lose at its hang-up"
    )
    parser.add_argument("--settle-s", type=float, default=5.0, help="after the last hang-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logs", default="", help="keep the processes' stderr here")
    parser.add_argument("--json", default="", help="also write the results here")
    return parser.parse_args(argv)


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run_loop(soak(args), fast=False)
    given = sys.argv[1:] if argv is None else argv
    print("\n".join([f"command: python -m bench soak {' '.join(given)}", *report.lines()]))
    if args.json:
        data = asdict(report)
        data["gaps"] = report.gaps()
        Path(args.json).write_text(json.dumps(data, indent=1, default=str))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(cli())
