"""Print the benchmark's tables from a ``python -m bench --json FILE`` result, or write them
into docs/benchmarks.md.

The doc holds them between marker lines, so that the published tables are exactly what a run
printed and regenerating them after a run is mechanical:

    python -m bench.doc_tables FILE                                  # print them (as the run did)
    python -m bench.doc_tables FILE --doc docs/benchmarks.md         # replace the "main" block
    python -m bench.doc_tables FILE --doc docs/benchmarks.md --block deflate
    python -m bench.doc_tables DIR/gateway-50.txt --profile --doc docs/benchmarks.md --block profile
    python -m bench.doc_tables replicas.json --doc docs/benchmarks.md --block replicas

A result of ``python -m bench replicas`` (its ``stage``) prints that stage's table.

A block is everything between ``<!-- bench:NAME begin -->`` and ``<!-- bench:NAME end -->``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.__main__ import render
from bench.profile import summarise


def replace_block(text: str, block: str, body: list[str]) -> str:
    """``text`` with the lines between block ``block``'s markers replaced by ``body``."""
    begin, end = f"<!-- bench:{block} begin -->", f"<!-- bench:{block} end -->"
    lines = text.split("\n")
    if lines.count(begin) != 1 or lines.count(end) != 1:
        raise ValueError(f"expected one {begin!r} and one {end!r} line")
    i, j = lines.index(begin), lines.index(end)
    if j < i:
        raise ValueError(f"{end!r} comes before {begin!r}")
    return "\n".join([*lines[: i + 1], "", *body, "", *lines[j:]])


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.doc_tables")
    parser.add_argument("json", type=Path, help="a result written by python -m bench --json")
    parser.add_argument(
        "--profile", action="store_true", help="the file is py-spy's (--profile): its summary"
    )
    parser.add_argument(
        "--doc", type=Path, help="write the tables into this file's block (docs/benchmarks.md)"
    )
    parser.add_argument("--block", default="main", help="which marked block (default: main)")
    args = parser.parse_args()
    if args.profile:
        body = [
            f"py-spy over the window (`python -m bench.profile {args.json.name}`):",
            "",
            "```",
            summarise(args.json, top=30),
            "```",
        ]
    else:
        data = json.loads(args.json.read_text())
        if data.get("stage") == "replicas":
            from bench.replicas import render as render_replicas

            body = render_replicas(data)
        else:
            body = render(data)
    if args.doc is None:
        print("\n".join(body))
        return 0
    try:
        args.doc.write_text(replace_block(args.doc.read_text(), args.block, body))
    except ValueError as exc:
        print(f"{args.doc}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
