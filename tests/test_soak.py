"""The soak benchmark runs end to end (tiny: two calls, seconds) and reports every figure.

Whether the gateway lost audio is what the soak measures and tests/test_survival_corners.py
asserts; here the instrument is checked: each call's session found by its pitch, the
disruptions made and attributed, the process figures taken at all four points, the verdict
agreeing with the figures. Speed is never asserted (shared, noisy machines).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_short_soak_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "soak",
            "--calls",
            "2",
            "--ramp-step",
            "2",
            "--minutes",
            "0.25",
            "--cut-every",
            "2,4",
            "--settle-s",
            "1",
            "--json",
            str(out),
            "--logs",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode in (0, 1), done.stderr[-2000:]
    text = done.stdout
    for header in (
        "| calls | turns | disruptions | every reply heard, in order | turns without a reply "
        "| replies heard with a gap | caller audio sent s",
        "| cause | turns | caller's gap ms p50 | p99 | max |",
        "| gateway | RSS MiB | open fds | sockets | threads | asyncio tasks |",
    ):
        assert header in text, text
    for point in ("idle before", "start", "end", "idle after"):
        assert f"| {point} |" in text, text
    data = json.loads(out.read_text())
    assert data["calls"] == 2 and data["unmatched_sessions"] == 0
    assert sorted(data["audio"]) == ["0", "1"]
    assert all(a["sessions"] and a["sent_s"] > 0 for a in data["audio"].values())
    assert data["disruptions"], "no disruption was made"
    assert sum(len(v) for v in data["gaps"].values()) == sum(
        1 for r in data["results"] for t in r["turns"] if t["reply_start"] is not None
    )
    lost = [a for a in data["audio"].values() if a["lost_s"] > data["tolerance_s"]]
    heard = all(r["error"] is None for r in data["results"])
    in_order = all(
        1 <= (b - a) % 50 <= 3 for r in data["results"] for a, b in itertools.pairwise(r["heard"])
    )
    verdict_ok = not lost and heard and in_order
    assert ("verdict: OK" in text) == verdict_ok == (done.returncode == 0), text
