"""Prefill time with compression / prefill time with the full cache, measured side by side.

Each method at ratio 0.75 is timed interleaved with the full cache on the same ~1k-token context,
``REPEATS`` times; the ratio of medians is printed. Target: <= 1.10 for scorers that need no
extra attention pass (marked "no" in the attention column).
"""

from __future__ import annotations

import statistics

from common import model_and_context, timed_prefill
from rich.console import Console
from rich.table import Table

from kvsqueeze import Recipe
from kvsqueeze.scorers import SCORERS

REPEATS = 5


def main() -> None:
    model, tokenizer, ids = model_and_context()
    full = Recipe.parse("full")
    timed_prefill(model, tokenizer, ids, full)  # warm-up
    table = Table(title=f"prefill time vs full cache, {ids.shape[1]} tokens, median of {REPEATS}")
    for column in ("recipe", "extra attention pass", "full s", "compressed s", "ratio", "target"):
        table.add_column(column, justify="right")
    for name, scorer_cls in SCORERS.items():
        recipe = Recipe.parse(f"{name}@0.75")
        full_times, method_times = [], []
        for _ in range(REPEATS):
            full_times.append(timed_prefill(model, tokenizer, ids, full)[1])
            method_times.append(timed_prefill(model, tokenizer, ids, recipe)[1])
        ratio = statistics.median(method_times) / statistics.median(full_times)
        needs_attention = scorer_cls.needs_attention
        target = "-" if needs_attention else ("met" if ratio <= 1.10 else "[red]missed[/]")
        table.add_row(
            str(recipe),
            "yes" if needs_attention else "no",
            f"{statistics.median(full_times):.3f}",
            f"{statistics.median(method_times):.3f}",
            f"{ratio:.3f}",
            target,
        )
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
