"""`python -m bench`: the gateway under 1, 50, 100 and 200 concurrent calls, against a naive one.

Processes, so that only the gateway's own cost is counted:

* the Live emulator (TLS, the real google-genai SDK connects to it) with a control server for
  resets (``bench.emulator_server``);
* the gateway, started as an operator starts it: ``python -m gateway`` with its settings in the
  environment (a fresh process per scenario);
* the naive baseline (``bench.naive_gateway``) the same way, on the same calls;
* the simulated callers (``bench.callers``).

For each number of calls: calls are placed, a warm-up passes, then over a steady window the
gateway process's own CPU counters (/proc/PID/stat, all threads) give core-seconds per
call-minute; its /metrics histogram ``gateway_added_latency_seconds`` (scraped at both ends of the
window) gives the added latency each way; its RSS at the end of the window minus its idle RSS
(after one warm-up call) gives memory per call; every call checks it heard every reply; the
callers time each turn from their own end of speech to the first sound of the reply (the
"turn gap", an external check: everything between the caller's ear and the model, both ways,
beyond the model's own pause). A reset run then gives every call an announced reset (goAway)
and an abrupt one (TCP reset) and measures the caller's extra wait for the replies around it.

A burst run (``--burst N,...``) answers N calls, then opens all their streams at the same moment
(as Twilio does for calls answered together), against the gateway with ``MAX_CALLS=N`` and
against the naive bridge: streams admitted and calls completed (one turn each), how long the
upgrades took, and how late the gateway read each ``start``.

Calls outliving their replica (a rolling deploy, a crash): ``python -m bench replicas``
(bench/replicas.py); many calls for minutes under random resets: ``python -m bench soak``.

Run: ``python -m bench`` (about 10 minutes); ``python -m bench --quick`` (a smoke run);
``python -m bench --calls '' --reset-calls 0 --burst 50,100,200`` (bursts only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp

from bench.common import (
    Histogram,
    cpu_seconds,
    gateway_env,
    histograms,
    rss_bytes,
)
from bench.common import run as run_loop
from gateway.testing.harness import free_port

ROOT = Path(__file__).resolve().parent.parent
WINDOW_S = 0.02  # the emulator's VAD window
LATENCY = "gateway_added_latency_seconds"
START_WAIT = "gateway_stream_start_wait_seconds"
# A stream closed with these before it became a call was refused (1008: closed while waiting
# for start, or its start refused; 1013: no call capacity); a later close (1011) is a call.
REFUSED = frozenset({1008, 1013})
GC_PAUSE = "gateway_gc_pause_seconds"
DIRECTIONS = ("caller_to_model", "model_to_caller")
MIB = 1024 * 1024
# Past this share of all cores busy (every process, the bench's and others'), the processes
# queue for CPU: the bridge that falls behind does less work per call-minute, so the ratio of
# the two bridges' CPU no longer compares like with like (the table says so).
SATURATED = 0.70
# `python -m gateway` on a given event loop, for comparing loops (--gateway-loop).
LOOP_WRAPPERS = {
    "asyncio": "import runpy, sys; sys.modules['uvloop'] = None; "
    "runpy.run_module('gateway', run_name='__main__', alter_sys=True)",
    "uvloop": "import asyncio, runpy, uvloop; "
    "asyncio.set_event_loop_policy(uvloop.EventLoopPolicy()); "
    "runpy.run_module('gateway', run_name='__main__', alter_sys=True)",
}


# --- processes ------------------------------------------------------------------------------


@dataclass
class Proc:
    """A child process whose stdout is read line by line."""

    name: str
    process: asyncio.subprocess.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    async def line(self, limit_s: float = 60.0) -> dict[str, Any]:
        assert self.process.stdout is not None
        raw = await asyncio.wait_for(self.process.stdout.readline(), limit_s)
        if not raw:
            raise RuntimeError(f"{self.name} exited ({self.tail()})")
        parsed: dict[str, Any] = json.loads(raw)
        return parsed

    def tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text().strip().splitlines()[-lines:])
        except OSError:
            return "no log"

    async def stop(self, sig: int = signal.SIGTERM, grace_s: float = 15.0) -> None:
        if self.process.returncode is not None:
            return
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.send_signal(sig)
            await asyncio.wait_for(self.process.wait(), grace_s)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
        except ProcessLookupError:
            pass


async def spawn(
    name: str,
    args: Sequence[str],
    env: dict[str, str],
    logs: Path,
    nice: int = 0,
    cwd: Path = ROOT,
) -> Proc:
    """Start ``python args...`` in ``cwd`` (the project root); ``nice`` < 0 favours it over
    other load on a shared machine (so that another job's bursts do not starve the measured
    processes)."""
    log_path = logs / f"{name}.log"
    with _append(log_path) as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            cwd=cwd,
            env={**os.environ, **env},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            limit=64 * MIB,
            preexec_fn=(lambda: os.setpriority(os.PRIO_PROCESS, 0, nice)) if nice else None,
        )
    return Proc(name, process, log_path)


@asynccontextmanager
async def emulator_server(
    tmp: str, logs: Path, options: Sequence[str], nice: int = 0
) -> AsyncIterator[tuple[Proc, dict[str, Any]]]:
    """``bench.emulator_server`` in a process of its own, keeping its files in ``tmp``, with
    ``options``: it and the line it prints once it serves (its addresses); stopped after."""
    emulator = await spawn(
        "emulator", ["-m", "bench.emulator_server", "--dir", tmp, *options], {}, logs, nice
    )
    try:
        yield emulator, await emulator.line(limit_s=30)
    finally:
        await emulator.stop()


def _append(path: Path) -> BinaryIO:
    return open(path, "ab")  # closed by the caller's with


async def wait_healthy(http: aiohttp.ClientSession, url: str, proc: Proc) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.process.returncode is not None:
            raise RuntimeError(f"{proc.name} exited: {proc.tail()}")
        try:
            async with http.get(url + "/healthz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{proc.name} not healthy: {proc.tail()}")


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return total - idle, total


# --- results --------------------------------------------------------------------------------


@dataclass
class Window:
    """Counters at both ends of the steady window."""

    seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # process name -> CPU seconds
    busy: float = 0.0  # machine-wide, fraction of all cores
    others: float = 0.0  # of which not the bench's processes (other jobs on a shared machine)
    latency: dict[str, Histogram] = field(default_factory=dict)
    gc: dict[str, Histogram] = field(default_factory=dict)  # generation -> pauses
    rss: int = 0


@dataclass
class Run:
    impl: str
    calls: int
    window: Window
    idle_rss: int
    results: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cpu_per_call_minute(self) -> float:
        cpu = self.window.cpu.get("gateway", math.nan)
        return cpu / self.window.seconds / self.calls * 60

    @property
    def calls_per_core(self) -> float:
        return 60 / self.cpu_per_call_minute

    @property
    def saturated(self) -> bool:
        return self.window.busy > SATURATED

    @property
    def rss_per_call_mib(self) -> float:
        return (self.window.rss - self.idle_rss) / self.calls / MIB

    @property
    def heard_ok(self) -> tuple[int, int]:
        return sum(bool(r["heard_ok"]) for r in self.results), len(self.results)

    def turn_delays(self) -> list[float]:
        return [
            t["reply_start"] - t["speech_end"]
            for r in self.results
            for t in r["turns"]
            if t["reply_start"] is not None
        ]


def model_pause(args: argparse.Namespace) -> float:
    """The emulator's own pause from the end of speech to its first reply audio."""
    pause: float = args.end_of_speech_s + args.response_delay_s
    return pause


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# --- one scenario ---------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    emulator: Proc
    emulator_info: dict[str, Any]
    http: aiohttp.ClientSession
    logs: Path

    def gateway_env(self, port: int) -> dict[str, str]:
        extra = dict(kv.split("=", 1) for kv in self.args.gateway_env)
        return extra | gateway_env(self.emulator_info, port)

    async def start_gateway(
        self, impl: str, settings: dict[str, str] | None = None
    ) -> tuple[Proc, str]:
        port = free_port()
        module = "bench.naive_gateway" if impl == "naive" else "gateway"
        argv = ["-m", module]
        if impl != "naive" and self.args.gateway_loop != "auto":
            argv = ["-c", LOOP_WRAPPERS[self.args.gateway_loop]]
        # "before:i": the gateway of another checkout (--baseline), with this one's Python;
        # "variant:i": this gateway with more settings (--variant).
        kind, _, index = impl.partition(":")
        cwd = Path(self.args.baseline[int(index)]) if kind == "before" else ROOT
        env = self.gateway_env(port)
        if kind == "variant":
            env |= variant_env(self.args.variant[int(index)])
        env |= settings or {}
        name = impl.replace(":", "-")
        proc = await spawn(name, argv, env, self.logs, self.args.nice, cwd=cwd)
        url = f"http://127.0.0.1:{port}"
        await wait_healthy(self.http, url, proc)
        return proc, url

    async def callers(
        self, url: str, calls: int, flags: Sequence[str] = (), **options: Any
    ) -> Proc:
        argv = ["-m", "bench.callers", "--url", url, "--calls", str(calls), *flags]
        argv += ["--reply-s", str(self.args.reply_s)]
        if self.args.line_noise_db is not None:
            argv += ["--line-noise-db", str(self.args.line_noise_db)]
        for key, value in options.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        return await spawn("callers", argv, {}, self.logs, self.args.nice)

    async def scrape(self, url: str) -> tuple[dict[str, Histogram], dict[str, Histogram]]:
        """The added-latency histograms by direction and the GC pauses by generation."""
        async with self.http.get(url + "/metrics") as resp:
            text = await resp.text()
        return histograms(text, LATENCY, "direction"), histograms(text, GC_PAUSE, "generation")

    async def control(self, path: str) -> dict[str, Any]:
        async with self.http.post(self.emulator_info["control_url"] + path) as resp:
            result: dict[str, Any] = await resp.json()
            return result

    async def run(
        self,
        impl: str,
        calls: int,
        seconds: float,
        during: Callable[[float], Any] | None = None,
    ) -> Run:
        """Start ``impl``, warm it with one call, then run ``calls`` calls over a window."""
        args = self.args
        gateway, url = await self.start_gateway(impl)
        try:
            if args.warm_call:  # load what the first call loads before taking the idle RSS
                warm = await self.callers(url, 1, turns=1)
                while (await warm.line())["event"] != "result":
                    pass
                await warm.stop()
            idle_rss = rss_bytes(gateway.pid)
            callers = await self.callers(
                url, calls, seconds=seconds, warmup=args.warmup, rate=args.rate
            )
            window = Window()
            pids = {
                "gateway": gateway.pid,
                "emulator": self.emulator.pid,
                "callers": callers.process.pid,
            }
            start: dict[str, float] = {}
            start_hist: dict[str, Histogram] = {}
            start_gc: dict[str, Histogram] = {}
            t0 = busy0 = total0 = 0.0
            profiler: asyncio.subprocess.Process | None = None
            background: asyncio.Task[Any] | None = None
            while True:
                msg = await callers.line(limit_s=seconds + 120)
                if msg["event"] == "steady":
                    t0 = time.monotonic()
                    start = {k: cpu_seconds(p) for k, p in pids.items()}
                    busy0, total0 = machine_busy()
                    if impl != "naive":
                        start_hist, start_gc = await self.scrape(url)
                        name = impl.replace(":", "-")
                        profiler = await self.profile(gateway.pid, name, calls, seconds)
                    if during is not None:
                        background = asyncio.create_task(during(t0))
                elif msg["event"] == "end":
                    window.seconds = time.monotonic() - t0
                    window.cpu = {k: cpu_seconds(p) - start[k] for k, p in pids.items()}
                    busy1, total1 = machine_busy()
                    window.busy = (busy1 - busy0) / max(total1 - total0, 1)
                    ours = sum(window.cpu.values()) / window.seconds / (os.cpu_count() or 1)
                    window.others = max(0.0, window.busy - ours)
                    window.rss = rss_bytes(gateway.pid)
                    if impl != "naive":
                        end_hist, end_gc = await self.scrape(url)
                        window.latency = {
                            d: end_hist[d].minus(start_hist[d]) for d in DIRECTIONS if d in end_hist
                        }
                        window.gc = {
                            g: h.minus(start_gc[g]) if g in start_gc else h
                            for g, h in end_gc.items()
                        }
                elif msg["event"] == "result":
                    results: list[dict[str, Any]] = msg["calls"]
                    break
            extra: dict[str, Any] = {}
            if background is not None:
                extra = await background
            if profiler is not None:
                await profiler.wait()
            await callers.stop()
            return Run(impl, calls, window, idle_rss, results, extra)
        finally:
            await gateway.stop()

    async def profile(
        self, pid: int, name: str, calls: int, seconds: float
    ) -> asyncio.subprocess.Process | None:
        """py-spy over the window, when --profile DIR is given (folded stacks, gateway only)."""
        if not self.args.profile:
            return None
        out = Path(self.args.profile) / f"{name}-{calls}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        spy = Path(sys.executable).parent / "py-spy"
        return await asyncio.create_subprocess_exec(
            str(spy),
            "record",
            "--nonblocking",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, int(seconds) - 1)),
            "--rate",
            "200",
            "--format",
            "raw",
            "-o",
            str(out),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

    async def burst(self, impl: str, calls: int) -> Burst:
        """``calls`` calls answered, then all their streams opened at once, one turn each,
        against ``impl`` (the gateway with MAX_CALLS = ``calls``)."""
        gateway, url = await self.start_gateway(impl, {"MAX_CALLS": str(calls)})
        try:
            callers = await self.callers(url, calls, flags=("--burst",), turns=1)
            while (msg := await callers.line(limit_s=180))["event"] != "result":
                pass
            await callers.stop()
            wait = None
            if impl != "naive":
                async with self.http.get(url + "/metrics") as resp:
                    text = await resp.text()
                wait = histograms(text, START_WAIT, "").get("")
            return Burst(impl, calls, msg["calls"], wait)
        finally:
            await gateway.stop()

    async def resets(self, calls: int, seconds: float) -> tuple[Run, dict[str, float]]:
        """A run in which every connection gets a goAway, then later dies abruptly."""
        time_left = min(5.0, seconds * 0.2)
        goaway_at = seconds * 0.12
        abrupt_at = seconds * 0.55

        async def resets(t0: float) -> dict[str, Any]:
            await asyncio.sleep(max(0.0, t0 + goaway_at - time.monotonic()))
            goaway = await self.control(f"/goaway?time_left={time_left}")
            await asyncio.sleep(max(0.0, t0 + abrupt_at - time.monotonic()))
            abrupt = await self.control("/cut")
            return {"goaway": goaway, "abrupt": abrupt, "time_left": time_left}

        run = await self.run("gateway", calls, seconds, during=resets)
        return run, {"goaway": run.extra["goaway"]["at"], "abrupt": run.extra["abrupt"]["at"]}


# --- bursts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Burst:
    """One burst: every call's result (bench.callers --burst) and the gateway's start waits."""

    impl: str
    calls: int
    results: list[dict[str, Any]]
    start_wait: Histogram | None  # the gateway's gateway_stream_start_wait_seconds

    def row(self) -> dict[str, Any]:
        sent = [r["upgrade_sent"] for r in self.results if r["upgrade_sent"] is not None]
        t0 = min(sent, default=math.nan)
        opened = [r["upgraded"] - t0 for r in self.results if r["upgraded"] is not None]
        admitted = sum(
            r["upgraded"] is not None and r["close_code"] not in REFUSED for r in self.results
        )
        wait = self.start_wait
        return {
            "impl": self.impl,
            "calls": self.calls,
            "sent_within_ms": 1000 * (max(sent, default=math.nan) - t0),
            "open_ms": [1000 * percentile(opened, 0.5), 1000 * max(opened, default=math.nan)],
            "admitted": admitted,
            "completed": sum(bool(r["heard_ok"]) for r in self.results),
            "heard": sum(r["heard"][:1] == [1] for r in self.results),
            "errors": sorted({r["error"] for r in self.results if r["error"]}),
            "start_wait_ms": None
            if wait is None
            else [1000 * wait.quantile(0.5), 1000 * wait.top_bound()],
        }


def burst_table(bursts: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| burst | bridge | upgrades sent within ms | streams open ms p50 / last "
        "| admitted (not refused) | reply heard | without a gap | start read ms p50 / at most |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in bursts:
        wait = b["start_wait_ms"]
        read = "-" if wait is None else f"{ms(wait[0])} / {ms(wait[1])}"
        bridge = b["label"] + (" (MAX_CALLS = burst)" if b["impl"] != "naive" else "")
        lines.append(
            f"| {b['calls']} | {bridge} | {ms(b['sent_within_ms'])} "
            f"| {ms(b['open_ms'][0])} / {ms(b['open_ms'][1])} "
            f"| {b['admitted']}/{b['calls']} | {b.get('heard', '-')}/{b['calls']} "
            f"| {b['completed']}/{b['calls']} | {read} |"
        )
    return lines


# --- reset gap ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResetGap:
    kind: str
    calls: int
    connections: int  # connections the emulator reset
    gaps_ms: tuple[float, ...]  # per call: the extra wait beyond an unaffected turn
    baseline_ms: float

    @property
    def median(self) -> float:
        return statistics.median(self.gaps_ms) if self.gaps_ms else math.nan

    @property
    def worst(self) -> float:
        return max(self.gaps_ms) if self.gaps_ms else math.nan


def reset_gaps(run: Run, times: dict[str, float], time_left: float) -> list[ResetGap]:
    """Per call and reset: the affected turns' delay minus the unaffected turns' median.

    A turn's delay is from the caller's end of speech to the start of the reply as heard to its
    end (a reply cut by a reset and said again counts from its second start). Affected turns:
    those whose [speech start, reply end] overlaps the reset ([goAway, goAway + timeLeft] for an
    announced reset, the instant for an abrupt one), or else the first turn after it.
    """
    spans = {"goaway": (times["goaway"], times["goaway"] + time_left)}
    spans["abrupt"] = (times["abrupt"], times["abrupt"])

    def affected(turns: list[dict[str, Any]], lo: float, hi: float) -> list[dict[str, Any]]:
        hit = [
            t
            for t in turns
            if t["speech_start"] <= hi and (t["reply_end"] is None or t["reply_end"] >= lo)
        ]
        if hit:
            return hit
        later = [t for t in turns if t["speech_start"] > hi]
        return later[:1]

    touched: set[int] = set()
    per_call: dict[str, list[list[dict[str, Any]]]] = {k: [] for k in spans}
    for result in run.results:
        for kind, (lo, hi) in spans.items():
            turns = affected(result["turns"], lo, hi)
            per_call[kind].append(turns)
            touched.update(id(t) for t in turns)
    unaffected = [
        t["reply_start"] - t["speech_end"]
        for r in run.results
        for t in r["turns"]
        if t["reply_start"] is not None and id(t) not in touched
    ]
    baseline = statistics.median(unaffected) if unaffected else math.nan
    gaps: list[ResetGap] = []
    for kind in spans:
        values = []
        for turns in per_call[kind]:
            delays = [
                (t["reply_start"] - t["speech_end"]) if t["reply_start"] is not None else math.inf
                for t in turns
            ]
            if delays:
                values.append(1000 * (max(delays) - baseline))
        connections = int(run.extra[kind]["connections"])
        gaps.append(ResetGap(kind, run.calls, connections, tuple(values), 1000 * baseline))
    return gaps


# --- transcoding ----------------------------------------------------------------------------


TRANSCODE_ROUNDS = 7


def transcoding(seconds: int) -> dict[str, float]:
    """x real time per core of the gateway's converters, wire to wire, as calls stream them:
    the best of TRANSCODE_ROUNDS rounds (a minute of audio takes tens of ms of CPU, so one
    round moved 2x between runs with whatever else the host did in those ms)."""
    from bench.transcode import realtime_factor, test_audio
    from gateway.audio import (
        MODEL_OUTPUT_RATE,
        TWILIO_RATE,
        CallerToModel,
        ModelToCaller,
        pcm16_to_ulaw,
    )

    caller = pcm16_to_ulaw(test_audio(TWILIO_RATE, seconds).tobytes())
    model = test_audio(MODEL_OUTPUT_RATE, seconds).tobytes()
    rounds = range(TRANSCODE_ROUNDS)
    return {
        "caller 8k mu-law -> 16k PCM, 20 ms frames": max(
            realtime_factor(CallerToModel, caller, 160, seconds) for _ in rounds
        ),
        "model 24k PCM -> 8k mu-law, 40 ms chunks": max(
            realtime_factor(ModelToCaller, model, 1920, seconds) for _ in rounds
        ),
    }


# --- table ----------------------------------------------------------------------------------


def ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}"


def result(
    runs: list[Run],
    gaps: list[ResetGap],
    speeds: dict[str, float],
    args: argparse.Namespace,
    bursts: Sequence[Burst] = (),
) -> dict[str, Any]:
    """Everything the tables show, as plain data (--json writes it; bench.doc_tables
    prints the same tables from it)."""
    pause = model_pause(args)
    rows = []
    for r in runs:
        gaps_ms = [1000 * (d - pause) for d in r.turn_delays()]
        rows.append(
            {
                "impl": r.impl,
                "label": label(r.impl, args),
                "calls": r.calls,
                "cpu_per_call_minute": r.cpu_per_call_minute,
                "cpu": r.window.cpu,
                "seconds": r.window.seconds,
                "rss_per_call_mib": r.rss_per_call_mib,
                "heard_ok": r.heard_ok,
                "busy": r.window.busy,
                "others": r.window.others,
                "latency_ms": {
                    d: [1000 * h.quantile(0.5), 1000 * h.quantile(0.99)]
                    for d, h in r.window.latency.items()
                },
                "turn_gap_ms": [percentile(gaps_ms, 0.5), percentile(gaps_ms, 0.99)],
                "gc": {
                    g: {
                        "count": h.count,
                        "p50_ms": 1000 * h.quantile(0.5),
                        "longest_under_ms": 1000 * h.top_bound(),
                    }
                    for g, h in sorted(r.window.gc.items())
                },
                "turn_delays": r.turn_delays(),
            }
        )
    return {
        "machine": machine(),
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "saturated_above": SATURATED,
        "runs": rows,
        "resets": [
            {
                "kind": g.kind,
                "calls": g.calls,
                "connections": g.connections,
                "median_ms": g.median,
                "worst_ms": g.worst,
                "gaps_ms": g.gaps_ms,
                "baseline_ms": g.baseline_ms,
            }
            for g in gaps
        ],
        "transcoding": speeds,
        "bursts": [b.row() | {"label": label(b.impl, args)} for b in bursts],
    }


def render(data: dict[str, Any]) -> list[str]:
    """The tables, in markdown, from `result` (or its JSON)."""
    out = [f"machine: {data['machine']}", f"command: {data['command']}", ""]
    if data["runs"]:
        out += table(data["runs"], data["saturated_above"])
    if any(r.get("gc") for r in data["runs"]):
        out += ["", *gc_table(data["runs"])]
    if data["resets"]:
        out += ["", *reset_table(data["resets"])]
    if data.get("cost"):
        from bench.cost import table as cost_table

        out += ["", *cost_table(data["cost"])]
    if data.get("bursts"):
        out += [*([""] if out[-1] else []), *burst_table(data["bursts"])]
    out += ["", "| transcoding | × real time per core |", "|---|---|"]
    out += [f"| {name} | {speed:.0f} |" for name, speed in data["transcoding"].items()]
    if any(r["impl"] == "naive" for r in data["runs"]):  # a comparison run: the targets
        out += ["", *targets(data["runs"], data["saturated_above"])]
    return out


def targets(runs: list[dict[str, Any]], saturated_above: float) -> list[str]:
    """Issue 13's targets against the default gateway's rows of this run."""
    gateway = {r["calls"]: r for r in runs if r["impl"] == "gateway"}
    naive = {r["calls"]: r for r in runs if r["impl"] == "naive"}
    lines = ["| target (issue 13) | measured | |", "|---|---|---|"]

    def row(target: str, measured: str, met: bool | str | None) -> None:
        verdict = met if isinstance(met, str) else {None: "not run", True: "met"}.get(met, "")
        lines.append(f"| {target} | {measured} | {verdict or 'not met'} |")

    # The 50 and 100 calls, and any other count of 10+ run for both bridges (where
    # neither saturates the machine, the ratio means something).
    for calls in sorted({50, 100} | {c for c in gateway if c in naive and c >= 10}):
        g, n = gateway.get(calls), naive.get(calls)
        if g is None or n is None:
            row(f"≥ 2× less CPU than naive at {calls} calls", "-", None)
            continue
        ratio = n["cpu_per_call_minute"] / g["cpu_per_call_minute"]
        busy = max(g["busy"], n["busy"]) > saturated_above
        met: bool | str = "saturated: means nothing" if busy else ratio >= 2
        row(f"≥ 2× less CPU than naive at {calls} calls", f"{ratio:.2f}×", met)
    g = gateway.get(100)
    for direction, bound in (("caller_to_model", 25.0), ("model_to_caller", 5.0)):
        p99 = g["latency_ms"].get(direction, [math.nan, math.nan])[1] if g else math.nan
        name = direction.replace("_to_", "→")
        row(
            f"p99 added {name} ≤ {bound:.0f} ms at 100 calls",
            f"{ms(p99)} ms",
            None if g is None else p99 <= bound,
        )
    loaded = [r["rss_per_call_mib"] for n, r in gateway.items() if n >= 50]  # 1 call: noise
    rss = max(loaded, default=math.nan)
    row(
        "≤ 1 MiB resident per call",
        f"{rss:.2f} MiB (most of the 50+ call rows)",
        None if not loaded else rss <= 1,
    )
    g = gateway.get(200)
    heard = f"{g['heard_ok'][0]}/{g['heard_ok'][1]}" if g else "-"
    row(
        "200 calls: every call hears every reply",
        heard,
        None if g is None else g["heard_ok"][0] == g["heard_ok"][1],
    )
    return lines


def gc_table(runs: list[dict[str, Any]]) -> list[str]:
    """The gateway's garbage-collection pauses in each window (they hold every call's audio)."""
    lines = [
        "| calls | gateway | full collections (gen 2) | their p50 ms | the longest under ms "
        "| gen 0 + 1 collections |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        gc = r.get("gc")
        if not gc:
            continue
        full = gc["2"]  # the gateway exports every generation from its start
        young = gc["0"]["count"] + gc["1"]["count"]
        lines.append(
            f"| {r['calls']} | {r['label']} | {full['count']:.0f} | {ms(full['p50_ms'])} "
            f"| {ms(full['longest_under_ms'])} | {young:.0f} |"
        )
    return lines


def table(runs: list[dict[str, Any]], saturated_above: float) -> list[str]:
    header = (
        "| calls | gateway | CPU core-s / call-min | calls / core | vs naive "
        "| added ms caller→model p50 / p99 | added ms model→caller p50 / p99 "
        "| turn gap ms p50 / p99 | RSS MiB / call | heard every reply | machine busy |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    naive = {r["calls"]: r for r in runs if r["impl"] == "naive"}
    any_saturated = False
    for r in runs:
        cpu = r["cpu_per_call_minute"]
        saturated = r["busy"] > saturated_above
        ratio = "-"
        if r["impl"] != "naive" and r["calls"] in naive:
            base = naive[r["calls"]]
            ratio = f"{base['cpu_per_call_minute'] / cpu:.2f}× less"
            if saturated or base["busy"] > saturated_above:
                ratio = f"({ratio}) saturated"
        any_saturated = any_saturated or saturated
        lat = []
        for d in DIRECTIONS:
            p50_p99 = r["latency_ms"].get(d)
            lat.append(f"{ms(p50_p99[0])} / {ms(p50_p99[1])}" if p50_p99 else "-")
        gap50, gap99 = r["turn_gap_ms"]
        ok, total = r["heard_ok"]
        flag = " saturated" if saturated else ""
        busy = f"{100 * r['busy']:.0f}% (others {100 * r['others']:.0f}%){flag}"
        lines.append(
            f"| {r['calls']} | {r['label']} | {cpu:.3f} | {60 / cpu:.0f} "
            f"| {ratio} | {lat[0]} | {lat[1]} | {ms(gap50)} / {ms(gap99)} "
            f"| {r['rss_per_call_mib']:.2f} | {ok}/{total} | {busy} |"
        )
    if any_saturated:
        lines += [
            "",
            f"saturated: the machine was over {100 * saturated_above:.0f}% busy in that window "
            "(all processes): bridges queue for CPU and fall behind, so their CPU ratio means "
            "nothing.",
        ]
    return lines


def variant_env(spec: str) -> dict[str, str]:
    """``NAME=VALUE,NAME=VALUE`` (a --variant) as environment variables."""
    return dict(kv.strip().split("=", 1) for kv in spec.split(",") if kv.strip())


def label(impl: str, args: argparse.Namespace) -> str:
    """The row's name, with the settings it ran with (--gateway-env, --variant, --baseline)."""
    settings = [kv for kv in args.gateway_env if kv.startswith("NAIVE_") == (impl == "naive")]
    kind, _, index = impl.partition(":")
    if kind == "before":
        impl, settings = "gateway", [f"before: {args.baseline[int(index)]}", *settings]
    elif kind == "variant":
        extra = [f"{k}={v}" for k, v in variant_env(args.variant[int(index)]).items()]
        impl, settings = "gateway", [*settings, *extra]
    return f"{impl} ({', '.join(settings)})" if settings else impl


def reset_table(gaps: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| reset | calls | connections reset | caller's gap ms median | worst | baseline turn ms |",
        "|---|---|---|---|---|---|",
    ]
    for g in gaps:
        lines.append(
            f"| {g['kind']} | {g['calls']} | {g['connections']} | {ms(g['median_ms'])} "
            f"| {ms(g['worst_ms'])} | {ms(g['baseline_ms'])} |"
        )
    return lines


# --- main -----------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        logs = Path(args.logs) if args.logs else Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        options = [
            "--reply-s",
            str(args.reply_s),
            "--end-of-speech-s",
            str(args.end_of_speech_s),
            "--response-delay-s",
            str(args.response_delay_s),
            *(["--deflate"] if args.emulator_deflate else []),
        ]
        async with emulator_server(tmp, logs, options, args.nice) as (emulator, info):
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
                bench = Bench(args, emulator, info, http, logs)
                runs: list[Run] = []
                impls = ["gateway"]
                impls += [f"variant:{i}" for i in range(len(args.variant))]
                impls += [f"before:{i}" for i in range(len(args.baseline))]
                if not args.no_naive:
                    impls.append("naive")
                for n in args.calls:
                    if args.concurrent:  # every row at once: all see the same machine
                        log(f"{', '.join(impls)}: {n} calls each, at once, {args.seconds:.0f} s")
                        together = [bench.run(impl, n, args.seconds) for impl in impls]
                        runs += await asyncio.gather(*together)
                        continue
                    for impl in impls:
                        log(f"{impl}: {n} calls for {args.seconds:.0f} s ...")
                        run = await bench.run(impl, n, args.seconds)
                        runs.append(run)
                        log(
                            f"  {run.cpu_per_call_minute:.3f} core-s/call-min, "
                            f"heard {run.heard_ok[0]}/{run.heard_ok[1]}"
                        )
                bursts: list[Burst] = []
                for n in args.burst:
                    for impl in impls:
                        log(f"{impl}: a burst of {n} calls ...")
                        bursts.append(await bench.burst(impl, n))
                        row = bursts[-1].row()
                        log(f"  admitted {row['admitted']}/{n}, completed {row['completed']}/{n}")
                gaps: list[ResetGap] = []
                if args.reset_calls:
                    log(f"resets: {args.reset_calls} calls for {args.reset_seconds:.0f} s ...")
                    reset_run, times = await bench.resets(args.reset_calls, args.reset_seconds)
                    gaps = reset_gaps(reset_run, times, reset_run.extra["time_left"])
        costs = []
        if args.cost_calls:
            from bench.cost import stage

            costs = await stage(args, logs, Path(tmp) / "cost")
    speeds = transcoding(args.transcode_seconds)

    data = result(runs, gaps, speeds, args, bursts) | {"cost": costs}
    print("\n".join(render(data)))
    if args.json:
        write_json(Path(args.json), data)
    return 0


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1))


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--calls", default="1,50,100,200", help="concurrent calls, comma list")
    parser.add_argument("--seconds", type=float, default=30.0, help="steady window per run")
    parser.add_argument("--warmup", type=float, default=3.0, help="after the last call is up")
    parser.add_argument("--rate", type=float, default=40.0, help="calls placed per second")
    parser.add_argument("--reset-calls", type=int, default=50, help="calls in the reset run")
    parser.add_argument(
        "--burst",
        default="",
        help="bursts: N calls whose streams open at once, comma list (e.g. 50,100,200)",
    )
    parser.add_argument("--reset-seconds", type=float, default=24.0)
    parser.add_argument("--reply-s", type=float, default=0.8, help="the emulator's replies")
    parser.add_argument("--end-of-speech-s", type=float, default=0.5)
    parser.add_argument("--response-delay-s", type=float, default=0.2)
    parser.add_argument("--transcode-seconds", type=int, default=60)
    parser.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    parser.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="DIR",
        help="also run the gateway of another checkout (e.g. git archive of the commit before "
        "a change), on the same calls in the same run: before/after from one run; repeatable",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=VALUE[,NAME=VALUE]",
        help="also run this gateway with these settings (a row of its own, same run); repeatable",
    )
    parser.add_argument(
        "--concurrent",
        action="store_true",
        help="run every row (gateway, variants, baselines, naive) at the same time, each with "
        "--calls calls: on a shared, noisy machine all rows then see the same load",
    )
    parser.add_argument(
        "--line-noise-db",
        type=float,
        default=None,
        help="callers send line noise at this level (dBFS) instead of digital silence",
    )
    parser.add_argument(
        "--emulator-deflate",
        action="store_true",
        help="the emulator accepts permessage-deflate (the real endpoint's behaviour is unknown)",
    )
    parser.add_argument(
        "--gateway-loop",
        choices=("auto", *LOOP_WRAPPERS),
        default="auto",
        help="the gateway's event loop (auto: what python -m gateway picks)",
    )
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the gateway (e.g. CALLER_AUDIO_BATCH_MS=40); repeatable",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="priority of the bench's processes (root: < 0); where the kernel shares CPU "
        "between sessions (autogroup), this session's group gets it too, for the run",
    )
    parser.add_argument("--profile", default="", help="py-spy the gateway into this folder")
    parser.add_argument("--logs", default="", help="keep the processes' stderr here")
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 calls, seconds")
    parser.add_argument("--no-warm-call", dest="warm_call", action="store_false")
    from bench.cost import cost_args

    cost_args(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.calls = "2"
        args.seconds = min(args.seconds, 2.0)
        args.warmup = 0.5
        args.warm_call = False
        args.reset_calls = min(args.reset_calls, 2)
        args.reset_seconds = min(args.reset_seconds, 8.0)
        args.transcode_seconds = 2
        args.cost_calls = min(args.cost_calls, 1)
        args.cost_minutes = min(args.cost_minutes, 0.5)
        args.burst = args.burst or "2"
    args.calls = [int(n) for n in str(args.calls).split(",") if n.strip()]
    args.burst = [int(n) for n in str(args.burst).split(",") if n.strip()]
    args.baseline = [str(Path(d).resolve()) for d in args.baseline]
    return args


def cli(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["soak"]:  # python -m bench soak: bench/soak.py
        from bench.soak import cli as soak

        return soak(argv[1:])
    if argv[:1] == ["replicas"]:  # python -m bench replicas: bench/replicas.py
        from bench.replicas import cli as replicas

        return replicas(argv[1:])
    args = parse_args(argv)
    with autogroup_nice(args.nice):
        return run_loop(main(args), fast=False)


@contextmanager
def autogroup_nice(nice: int) -> Iterator[None]:
    """With autogroup scheduling, CPU is shared fairly between sessions and a process's nice
    only ranks it inside its own: so --nice < 0 also ranks this session's group (the bench
    and its children), and puts it back afterwards."""
    path = Path("/proc/self/autogroup")
    before = None
    if nice < 0:
        try:
            before = int(path.read_text().split("nice")[1])
            path.write_text(str(nice))
        except (OSError, IndexError, ValueError):
            before = None  # no autogroup here (or not allowed): process nice alone
    try:
        yield
    finally:
        if before is not None:
            path.write_text(str(before))


if __name__ == "__main__":
    sys.exit(cli())
