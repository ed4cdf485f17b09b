"""The benchmark runs end to end (tiny: 2 calls, seconds) and prints every column.

Speed is never asserted here: these machines are shared and noisy; the numbers are in the
README, from a full run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_prints_the_whole_table(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out), "--logs", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    text = done.stdout
    header = next(line for line in text.splitlines() if line.startswith("| calls |"))
    for column in (
        "CPU core-s / call-min",
        "calls / core",
        "vs naive",
        "added ms caller→model p50 / p99",
        "added ms model→caller p50 / p99",
        "turn gap ms p50 / p99",
        "RSS MiB / call",
        "heard every reply",
    ):
        assert column in header
    rows = [line for line in text.splitlines() if line.startswith("| 2 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["gateway", "naive"]
    gateway = [cell.strip() for cell in rows[0].split("|")[1:-1]]
    assert gateway[4].endswith("× less")  # the ratio to the naive baseline
    assert all(cell not in ("", "nan") for cell in gateway)
    assert gateway[5] != "-" and gateway[6] != "-"  # the gateway's own latency histograms
    assert gateway[9] == "2/2", text  # both calls heard every reply
    for kind in ("goaway", "abrupt"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {kind} |"))
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        assert cells[1] == "2" and int(cells[2]) >= 2, row  # both calls' connections reset
    assert "caller 8k mu-law -> 16k PCM" in text and "model 24k PCM -> 8k mu-law" in text
    assert out.exists()
