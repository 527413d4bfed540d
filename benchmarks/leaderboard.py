"""Leaderboard: every method of the library at ratios 0.5 / 0.75 / 0.875 on the default eval suite.

Runs ``kvsqueeze eval --preset leaderboard`` (query-agnostic; add ``--query-aware`` for the other
mode) and writes ``results.jsonl``, ``summary.md`` and the PNG plots to ``docs/leaderboard`` (or
``--out``). Resumable: rerun to finish an interrupted run. Prints the wall time.

    .venv/bin/python benchmarks/leaderboard.py [--out DIR] [--query-aware] [--chunk-size N]
"""

from __future__ import annotations

import argparse
import sys
import time

from kvsqueeze.cli import main as kvsqueeze_main
from kvsqueeze.eval import leaderboard
from kvsqueeze.prefill import DEFAULT_CHUNK_SIZE


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", default=leaderboard.OUT_DIR, help=f"output dir (default {leaderboard.OUT_DIR})"
    )
    parser.add_argument("--query-aware", action="store_true", help="compress with the question visible")
    parser.add_argument(
        "--chunk-size",
        default=str(DEFAULT_CHUNK_SIZE),
        metavar="N",
        help=f"prefill chunk (default {DEFAULT_CHUNK_SIZE}, the server's; 0 = the whole context at once, "
        "as the docs/leaderboard run)",
    )
    args = parser.parse_args()
    argv = ["eval", "--preset", "leaderboard", "--out", args.out, "--chunk-size", args.chunk_size]
    if args.query_aware:
        argv.append("--query-aware")
    start = time.perf_counter()
    status = kvsqueeze_main(argv)
    wall = time.perf_counter() - start
    print(f"leaderboard wall time: {wall / 60:.1f} min ({wall:.0f} s), exit status {status}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
