"""`python -m bench replicas`: do calls outlive their replica? A rolling deploy and a crash.

Processes, as in ``python -m bench``: the Live emulator (``bench.emulator_server``, refusing
a second connection of a session as the public record says the service does), a real
``redis-server`` (``gateway.testing.redis_server``), ``--replicas`` gateway processes
(``python -m gateway``, the same ``REDIS_URL``, a greeting), the callers in this process:
the Twilio simulator spreading its requests round robin over the replicas' base URLs, as a
load balancer does, and going on to the ``<Connect action>`` when a stream ends.

Each call waits for the greeting, then talks in turns (a 1 s tone at a pitch of its own, the
line kept open until the reply was heard, a pause). Once every call is up:

1. **rolling deploy**: for each replica in turn, a fresh one is started, and once it is
   ready the old one leaves the load balancer and gets SIGTERM (its calls are handed off at
   their next pause); it is timed to its exit;
2. **crash**: one replica gets SIGKILL and leaves the load balancer at the same moment (a
   real one notices within its health checks; a request sent to the dead replica meanwhile
   would fail); a fresh one is started in its place.

Then the calls talk a little more and hang up. With ``--naive`` (the default) the naive
bridge (``bench.naive_gateway``: no store, no action, no resumption) plays the crash too,
on replicas of its own.

Per scenario, over the calls whose stream ended in it:

* survived / dropped: the call got a new stream (and heard a reply on it) / it ended;
* the caller's gap: from the old stream's end to the new stream's start (the caller's audio
  reaches no one meanwhile), p50 / p99 / max; and the added wait of the turn it fell in
  (its reply's delay minus the median of the turns no scenario touched);
* caller audio not delivered, per call: what the caller said over the scenario (sent, or
  said with no stream open) minus what the call's Live session(s) hold more at its end (the
  emulator's control server; each call's sessions are told by the pitch they hold):
  the gap, and with a crash what the caller said after the last stored handle;
* second greetings: replies a text turn prompted, beyond the call's first (must be 0);
* the Live session: resumed (the call still has one session) or fresh, from a brief.

The machine's load (all processes) over the run is reported: the issue asks for fewer calls
if it would pass 70 % busy. Exit status 1 if a gateway call dropped or was greeted twice.

Run: ``python -m bench replicas`` (50 calls, 2 replicas); ``--calls 10`` for a short one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.__main__ import Proc, emulator_server, machine, machine_busy, spawn, wait_healthy
from bench.common import AUTH_TOKEN, PUBLIC_URL, gateway_env
from bench.common import run as run_loop
from bench.soak import BASE_HZ, MATCH_HZ, PAUSE_S, STEP_HZ, TONE_S, await_reply, pitch
from gateway.store import RedisStore
from gateway.testing.harness import free_port
from gateway.testing.redis_server import RedisServer
from gateway.testing.twilio_sim import SAMPLE_RATE, SimulatedCall, TwilioCallerSimulator

PCM_PER_ULAW = 4  # one 8 kHz mu-law byte is two 16-bit samples at 16 kHz
PCM_RATE = 32000  # bytes of 16 kHz PCM16 per second
SETTLE_LIMIT_S = 30.0  # for every call to have a stream again after a scenario
READY_LIMIT_S = 30.0
#: A caller who heard no reply for this long speaks again, as a person would ("hello?"):
#: what they said while their stream was lost with its replica never reached the model.
REPLY_WAIT_S = 6.0
GREETING = "Greet the caller."


# --- the replicas -------------------------------------------------------------------------


@dataclass
class Replica:
    name: str
    proc: Proc
    url: str


@dataclass
class Cluster:
    """The replicas of one bridge, and the load balancer in front of them (the simulator's
    base URLs)."""

    impl: str  # "gateway" or "naive"
    env: dict[str, str]
    logs: Path
    http: aiohttp.ClientSession
    redis_url: str = ""
    live: list[Replica] = field(default_factory=list)
    started: int = 0
    sim: TwilioCallerSimulator | None = None

    async def start(self) -> Replica:
        port = free_port()
        self.started += 1
        name = f"{self.impl}-{self.started}"
        module = "bench.naive_gateway" if self.impl == "naive" else "gateway"
        env = self.env | {"PORT": str(port)}
        proc = await spawn(name, ["-m", module], env, self.logs)
        url = f"http://127.0.0.1:{port}"
        await wait_healthy(self.http, url, proc)
        replica = Replica(name, proc, url)
        if self.redis_url:
            await self.wait_ready(len(self.live) + 1)
        return replica

    async def wait_ready(self, count: int) -> None:
        """Until ``count`` replicas say in the store that they take calls."""
        store = RedisStore(self.redis_url)
        try:
            for _ in range(round(READY_LIMIT_S / 0.05)):
                if await store.others_ready("bench") >= count:
                    return
                await asyncio.sleep(0.05)
            raise TimeoutError(f"{count} replicas not ready in the store")
        finally:
            await store.aclose()

    def balance(self, replicas: list[Replica]) -> None:
        """The load balancer's endpoints from now on."""
        self.live = replicas
        if self.sim is not None:
            self.sim.set_bases([r.url for r in replicas])

    async def stop(self) -> None:
        for replica in self.live:
            await replica.proc.stop()


# --- calls --------------------------------------------------------------------------------


@dataclass
class Turn:
    speech_start: float
    speech_end: float
    reply_start: float | None = None


@dataclass
class Caller:
    index: int
    call: SimulatedCall | None = None
    turns: list[Turn] = field(default_factory=list)
    error: str | None = None

    @property
    def pitch(self) -> float:
        return pitch(self.index)


async def talk(
    sim: TwilioCallerSimulator, caller: Caller, stop: asyncio.Event, reply_s: float, greet: bool
) -> None:
    """Place the call, hear its greeting, talk in turns until ``stop``, hang up."""
    min_bytes = int(0.9 * reply_s * SAMPLE_RATE)
    try:
        call = caller.call = await sim.place_call()
    except Exception as exc:
        caller.error = f"place_call: {type(exc).__name__}: {exc}"
        return
    async with call:
        if greet and await await_reply(call, 0, min_bytes, REPLY_WAIT_S) is None:
            caller.error = "no greeting"
        while not stop.is_set() and not call.closed:
            first = len(call.record.heard)
            turn = Turn(time.monotonic(), 0.0)
            await call.speak_tone(caller.pitch, TONE_S)
            turn.speech_end = time.monotonic()
            caller.turns.append(turn)
            found = await await_reply(call, first, min_bytes, REPLY_WAIT_S)
            if found is not None:
                turn.reply_start = found[0]
                await call.silence(PAUSE_S)


@dataclass
class Point:
    """Per call at one moment: caller audio said (as 16 kHz PCM bytes; ``unsent``: said
    while no stream was open), what its sessions hold, how many sessions it has, and their
    replies a text turn prompted."""

    said: dict[int, int]
    unsent: dict[int, int]
    held: dict[int, int]
    sessions: dict[int, int]
    text_turns: dict[int, int]


async def point(http: aiohttp.ClientSession, control: str, callers: list[Caller]) -> Point:
    async with http.get(control + "/sessions") as resp:
        sessions: list[dict[str, Any]] = await resp.json()
    said, unsent = {}, {}
    for c in callers:
        record = c.call.record if c.call is not None else None
        sent = 0 if record is None else len(record.sent_ulaw)
        unsent[c.index] = 0 if record is None else len(record.unsent_ulaw) * PCM_PER_ULAW
        said[c.index] = sent * PCM_PER_ULAW + unsent[c.index]
    held = dict.fromkeys(said, 0)
    count = dict.fromkeys(said, 0)
    text = dict.fromkeys(said, 0)
    for session in sessions:
        freq = float(session.get("head_freq") or 0.0)
        index = round((freq - BASE_HZ) / STEP_HZ)
        if index not in said or abs(freq - pitch(index)) > MATCH_HZ:
            continue
        held[index] += int(session["audio_bytes"])
        count[index] += 1
        text[index] += int(session.get("text_turns", 0))
    return Point(said, unsent, held, count, text)


# --- scenarios ----------------------------------------------------------------------------


@dataclass
class Scenario:
    bridge: str
    kind: str  # "deploy" or "crash"
    replica: str
    at: float
    until: float = math.inf
    exit_s: float | None = None  # SIGTERM to the process' exit
    before: Point | None = None
    after: Point | None = None


def transitions(call: SimulatedCall) -> list[tuple[float, float | None]]:
    """Each stream's end and the next stream's start (None: the call ended instead)."""
    events = call.record.events
    out: list[tuple[float, float | None]] = []
    for i, (at, kind, _) in enumerate(events):
        if kind != "stream_closed":
            continue
        later = [t for t, k, _ in events[i + 1 :] if k in ("start_tx", "closed")]
        kinds = [k for _, k, _ in events[i + 1 :] if k in ("start_tx", "closed")]
        out.append((at, later[0] if kinds[:1] == ["start_tx"] else None))
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarise(scenario: Scenario, callers: list[Caller], baseline_s: float) -> dict[str, Any]:
    """The scenario's row (see the module's docstring)."""
    affected, survived, dropped = 0, 0, 0
    gaps: list[float] = []
    extra: list[float] = []
    no_stream: list[float] = []  # caller audio said while the call had no stream
    not_held: list[float] = []  # sent to a gateway, not in the call's Live session
    unanswered = 0
    resumed = fresh = greetings = 0
    for c in callers:
        if c.call is None:
            continue
        mine = [(a, b) for a, b in transitions(c.call) if scenario.at <= a < scenario.until]
        if not mine:
            continue
        affected += 1
        started_at = mine[-1][1]
        heard_after = started_at is not None and any(
            t.reply_start is not None and t.reply_start > started_at for t in c.turns
        )
        if heard_after:
            survived += 1
        else:
            dropped += 1
        gaps += [b - a for a, b in mine if b is not None]
        unanswered += sum(
            t.reply_start is None and t.speech_end >= mine[0][0] - TONE_S - REPLY_WAIT_S
            for t in c.turns
            if t.speech_start < scenario.until
        )
        waits = [
            t.reply_start - t.speech_end
            for t in c.turns
            if t.reply_start is not None and t.reply_start > mine[0][0]
        ]
        if waits:
            extra.append(waits[0] - baseline_s)
        before, after = scenario.before, scenario.after
        if before is not None and after is not None:
            said = after.said[c.index] - before.said[c.index]
            held = after.held[c.index] - before.held[c.index]
            gone = after.unsent[c.index] - before.unsent[c.index]
            no_stream.append(gone / PCM_RATE)
            not_held.append(max(0, said - held - gone) / PCM_RATE)
            greetings += max(0, after.text_turns[c.index] - max(1, before.text_turns[c.index]))
            if heard_after:
                if after.sessions[c.index] > before.sessions[c.index]:
                    fresh += 1
                else:
                    resumed += 1
    return {
        "bridge": scenario.bridge,
        "kind": scenario.kind,
        "replica": scenario.replica,
        "calls": affected,
        "survived": survived,
        "dropped": dropped,
        "gap_ms": [1000 * percentile(gaps, q) for q in (0.5, 0.99, 1.0)],
        "turn_added_ms": [1000 * percentile(extra, q) for q in (0.5, 1.0)],
        "unanswered": unanswered,
        "no_stream_s": [percentile(no_stream, 0.5), percentile(no_stream, 1.0)],
        "not_held_s": [percentile(not_held, 0.5), percentile(not_held, 1.0)],
        "second_greetings": greetings,
        "resumed": resumed,
        "fresh": fresh,
        "exit_s": scenario.exit_s,
    }


# --- the run ------------------------------------------------------------------------------


async def settle(callers: list[Caller]) -> None:
    """Until every call still up has a stream again (or SETTLE_LIMIT_S)."""
    deadline = time.monotonic() + SETTLE_LIMIT_S
    while time.monotonic() < deadline:
        calls = [c.call for c in callers if c.call is not None]
        if all(call.closed or call.streaming for call in calls):
            break
        await asyncio.sleep(0.1)


async def place(
    cluster: Cluster, args: argparse.Namespace, stop: asyncio.Event, greet: bool
) -> tuple[list[Caller], list[asyncio.Task[None]]]:
    sim = TwilioCallerSimulator(cluster.http, [r.url for r in cluster.live], PUBLIC_URL, AUTH_TOKEN)
    cluster.sim = sim
    callers = [Caller(i) for i in range(args.calls)]
    tasks = []
    for caller in callers:
        tasks.append(asyncio.create_task(talk(sim, caller, stop, args.reply_s, greet)))
        await asyncio.sleep(1.0 / args.rate)
    log(f"{cluster.impl}: {args.calls} calls placed ...")
    return callers, tasks


async def deploy(cluster: Cluster, old: Replica, callers: list[Caller]) -> Scenario:
    """Replace ``old``: a fresh replica first, then SIGTERM to the old one, timed to its exit."""
    fresh = await cluster.start()
    scenario = Scenario(cluster.impl, "deploy", old.name, time.monotonic())
    log(f"{cluster.impl}: deploy: SIGTERM to {old.name} ({fresh.name} ready)")
    cluster.balance([r for r in cluster.live if r is not old] + [fresh])
    old.proc.process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(old.proc.process.wait(), 60.0)
        scenario.exit_s = time.monotonic() - scenario.at
    except TimeoutError:
        await old.proc.stop(signal.SIGKILL)
    await settle(callers)
    scenario.until = time.monotonic()
    return scenario


def holding(replica: Replica, callers: list[Caller]) -> int:
    """How many calls have their stream open on ``replica`` now."""
    port = replica.url.rsplit(":", 1)[1]
    count = 0
    for c in callers:
        if c.call is None or not c.call.streaming:
            continue
        sent = [detail for _, kind, detail in c.call.record.events if kind == "stream_tx"]
        count += bool(sent) and sent[-1].split("/")[2].endswith(":" + port)
    return count


async def crash(cluster: Cluster, callers: list[Caller]) -> Scenario:
    """SIGKILL to the replica holding the most calls, out of the load balancer at once; a
    fresh one started in its place."""
    victim = max(cluster.live, key=lambda r: holding(r, callers))
    scenario = Scenario(cluster.impl, "crash", victim.name, time.monotonic())
    log(f"{cluster.impl}: crash: SIGKILL to {victim.name}")
    victim.proc.process.send_signal(signal.SIGKILL)
    cluster.balance([r for r in cluster.live if r is not victim])
    await victim.proc.process.wait()
    fresh = await cluster.start()
    cluster.balance([*cluster.live, fresh])
    await settle(callers)
    scenario.until = time.monotonic()
    return scenario


async def run_bridge(
    impl: str,
    args: argparse.Namespace,
    http: aiohttp.ClientSession,
    info: dict[str, Any],
    logs: Path,
    redis_url: str,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    env = gateway_env(info, 0, "INFO") | {
        "GREETING": GREETING if impl == "gateway" else "",
        "SILENCE_SUPPRESSION": "false",  # every frame reaches the model: sent vs held
    }
    if impl == "gateway":
        env["REDIS_URL"] = redis_url
    cluster = Cluster(impl, env, logs, http, redis_url if impl == "gateway" else "")
    scenarios: list[Scenario] = []
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    callers: list[Caller] = []
    control = info["control_url"]
    try:
        for _ in range(args.replicas):
            cluster.balance([*cluster.live, await cluster.start()])
        callers, tasks = await place(cluster, args, stop, greet=impl == "gateway")
        await asyncio.sleep(args.warmup)
        mark = await point(http, control, callers)
        steps = list(cluster.live) if impl == "gateway" else []
        for old in steps:
            scenarios.append(await deploy(cluster, old, callers))
            await asyncio.sleep(args.settle_s)  # resumed, and a turn on
            scenarios[-1].before, mark = mark, await point(http, control, callers)
            scenarios[-1].after = mark
        scenarios.append(await crash(cluster, callers))
        await asyncio.sleep(args.settle_s)
        scenarios[-1].before, scenarios[-1].after = mark, await point(http, control, callers)
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await cluster.stop()
    touched = [
        (s.at, s.until + 5.0) for s in scenarios
    ]  # a turn touched: its speech or reply overlaps a scenario
    calm = [
        t.reply_start - t.speech_end
        for c in callers
        for t in c.turns
        if t.reply_start is not None
        and not any(lo <= t.reply_start and t.speech_start <= hi for lo, hi in touched)
    ]
    baseline = statistics.median(calm) if calm else math.nan
    rows = [summarise(s, callers, baseline) for s in scenarios]
    errors = sorted({c.error for c in callers if c.error})
    return rows, {"bridge": impl, "baseline_turn_ms": 1000 * baseline, "errors": errors}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="replicas-") as tmp:
        logs = Path(args.logs) if args.logs else Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        options = [
            "--reply-s",
            str(args.reply_s),
            "--handle-interval",
            args.handle_interval,
            "--concurrent-resume",
            args.concurrent_resume,
            "--audio-head-s",
            "8",
        ]
        busy0, total0 = machine_busy()
        load = os.getloadavg()[0]
        rows: list[dict[str, Any]] = []
        bridges: list[dict[str, Any]] = []
        async with (
            emulator_server(tmp, logs, options) as (_, info),
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
        ):
            with RedisServer() as redis:
                for impl in ["gateway", *(["naive"] if args.naive else [])]:
                    found, summary = await run_bridge(impl, args, http, info, logs, redis.url)
                    rows += found
                    bridges.append(summary)
        busy1, total1 = machine_busy()
    return {
        "stage": "replicas",
        "machine": machine(),
        "command": " ".join(["python -m bench replicas", *args.argv]),
        "calls": args.calls,
        "replicas": args.replicas,
        "busy": (busy1 - busy0) / max(total1 - total0, 1),
        "load_before": load,
        "scenarios": rows,
        "bridges": bridges,
    }


# --- the table ----------------------------------------------------------------------------


def ms(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.0f}"


def seconds(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def render(data: dict[str, Any]) -> list[str]:
    """The table, in markdown, from :func:`bench`'s result (or its JSON)."""
    out = [
        f"machine: {data['machine']}",
        f"command: {data['command']}",
        f"{data['calls']} calls over {data['replicas']} replicas; machine busy over the run "
        f"{100 * data['busy']:.0f} % (all processes; load average before "
        f"{data['load_before']:.1f})",
        "",
        "| bridge | scenario | calls on it | survived | dropped "
        "| caller's gap ms p50 / p99 / max | turn's added wait ms p50 / max "
        "| caller turns unanswered | caller audio s per call, said with no stream p50 / max "
        "| sent, not in the session p50 / max | second greetings "
        "| same session / fresh brief | replica exit s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["scenarios"]:
        gap, added = r["gap_ms"], r["turn_added_ms"]
        no_stream, not_held = r["no_stream_s"], r["not_held_s"]
        exit_s = "-" if r["exit_s"] is None else f"{r['exit_s']:.1f}"
        out.append(
            f"| {r['bridge']} | {r['kind']} ({r['replica']}) | {r['calls']} | {r['survived']} "
            f"| {r['dropped']} | {ms(gap[0])} / {ms(gap[1])} / {ms(gap[2])} "
            f"| {ms(added[0])} / {ms(added[1])} | {r['unanswered']} "
            f"| {seconds(no_stream[0])} / {seconds(no_stream[1])} "
            f"| {seconds(not_held[0])} / {seconds(not_held[1])} "
            f"| {r['second_greetings']} | {r['resumed']} / {r['fresh']} | {exit_s} |"
        )
    for b in data["bridges"]:
        line = f"{b['bridge']}: a turn no scenario touched waits {ms(b['baseline_turn_ms'])} ms"
        out.append("")
        out.append(line + (f"; call errors: {b['errors']}" if b["errors"] else ""))
    return out


def ok(data: dict[str, Any]) -> bool:
    """No gateway call dropped or greeted twice."""
    rows = [r for r in data["scenarios"] if r["bridge"] == "gateway"]
    return all(r["dropped"] == 0 and r["second_greetings"] == 0 for r in rows)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench replicas", description=__doc__)
    parser.add_argument("--calls", type=int, default=50, help="concurrent calls")
    parser.add_argument("--replicas", type=int, default=2, help="gateway processes")
    parser.add_argument("--rate", type=float, default=10.0, help="calls placed per second")
    parser.add_argument("--warmup", type=float, default=8.0, help="s after the last call")
    parser.add_argument(
        "--settle-s",
        type=float,
        default=12.0,
        help="s after each scenario: calls talk on (a caller whose words were lost asks again)",
    )
    parser.add_argument("--reply-s", type=float, default=0.8)
    parser.add_argument("--handle-interval", default="0.2,1.0", help="MIN,MAX s")
    parser.add_argument(
        "--concurrent-resume", choices=("fork", "takeover", "refuse"), default="refuse"
    )
    parser.add_argument(
        "--no-naive", dest="naive", action="store_false", help="skip the naive bridge's crash"
    )
    parser.add_argument("--logs", default="", help="keep the processes' stderr here")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    if args.replicas < 2:
        parser.error("--replicas: at least 2 (a hand-off needs another replica)")
    args.argv = argv
    return args


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[2:] if argv is None else argv)
    data = run_loop(bench(args), fast=False)
    print("\n".join(render(data)))
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))
    return 0 if ok(data) else 1


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
