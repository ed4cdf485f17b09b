"""Print the benchmark's tables from a ``python -m bench --json FILE`` result.

The README's Benchmark section is pasted from this, so regenerating it after a run is
mechanical: ``python -m bench.readme_tables FILE`` prints exactly what the run printed
(machine, command, the side-by-side table, resets, transcoding).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.__main__ import render


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.readme_tables")
    parser.add_argument("json", type=Path, help="a result written by python -m bench --json")
    args = parser.parse_args()
    print("\n".join(render(json.loads(args.json.read_text()))))


if __name__ == "__main__":
    main()
