"""Summarise a py-spy profile (``python -m bench --profile DIR`` writes folded stacks).

``python -m bench.profile DIR/gateway-50.txt`` prints, per function, the share of samples
it was on the stack for, and the share per layer (gateway code, audio numerics, the Live
SDK, websockets, aiohttp, TLS, the event loop). Samples whose innermost frame is the event
loop's wait (``select``) or a socket write are left out: py-spy counts a thread preempted in
those system calls as busy, while ``perf`` shows the kernel is ~11% of the process's CPU.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

IDLE_LEAVES = ("EpollSelector.select", "_SelectorSocketTransport.write", "Loop.run_forever")
LOOP_LEAVES = ("Runner.run",)  # py-spy sees no frames inside uvloop: its work shows here
LAYERS = (  # first match wins, innermost frame first
    ("audio numerics (resamplers)", ("gateway/audio.py",)),
    ("Live SDK (google-genai, pydantic)", ("genai/", "pydantic/")),
    ("websockets (Live connection)", ("websockets/",)),
    ("TLS", ("ssl.py", "sslproto.py")),
    ("aiohttp (Twilio side)", ("aiohttp/",)),
    ("gateway code", ("gateway/",)),
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    ("json", ("json/",)),
)


def frames(line: str) -> tuple[list[str], int]:
    stack, _, count = line.rstrip().rpartition(" ")
    return [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")], int(count)


def summarise(path: Path, top: int) -> str:
    inclusive: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        stack, count = frames(line)
        if stack[-1].startswith(IDLE_LEAVES):
            continue
        total += count
        for frame in set(stack):
            inclusive[frame] += count
        layer = "event loop, sockets, other"
        if stack[-1].startswith(LOOP_LEAVES):  # uvloop's own C code: polling, callbacks, I/O
            layers["event loop (uvloop, in C: callbacks, socket I/O)"] += count
            continue
        for frame in reversed(stack):
            hit = next((name for name, keys in LAYERS if any(k in frame for k in keys)), None)
            if hit is not None:
                layer = hit
                break
        layers[layer] += count
    out = [f"{total} samples (waits in select and socket writes left out)", "", "by layer:"]
    out += [f"  {100 * c / total:5.1f}%  {name}" for name, c in layers.most_common()]
    out += ["", "by function (on the stack):"]
    out += [f"  {100 * c / total:5.1f}%  {name}" for name, c in inclusive.most_common(top)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("path", type=Path, help="folded stacks from py-spy record --format raw")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    print(summarise(args.path, args.top))


if __name__ == "__main__":
    main()
