"""Real bytes held vs the theoretical budget, for every method at ratios 0.5 / 0.75 / 0.9.

Theoretical bytes = layers x KV heads x ceil((1 - ratio) x context tokens) x (key + value dims)
x dtype size: what an ideal cache keeping exactly the budget would hold. Real bytes are
``cache.nbytes()``: every tensor held, slot indices and scorer state included. Target: within 5%.
"""

from __future__ import annotations

import math

from common import model_and_context, timed_prefill
from rich.console import Console
from rich.table import Table

from kvsqueeze import Recipe
from kvsqueeze.models import kv_cache_spec
from kvsqueeze.scorers import SCORERS

RATIOS = (0.5, 0.75, 0.9)


def main() -> None:
    model, _, ids = model_and_context()
    layers, kv_heads, head_dim = kv_cache_spec(model.config)
    tokens = ids.shape[1]
    table = Table(title=f"real vs theoretical KV bytes, {tokens}-token context, {model.dtype}")
    for column in ("recipe", "tokens kept / head", "real bytes", "theoretical", "real / theory", "within 5%"):
        table.add_column(column, justify="right")
    worst = 0.0
    for name in SCORERS:
        for ratio in RATIOS:
            recipe = Recipe.parse(f"{name}@{ratio}")
            cache, _ = timed_prefill(model, ids, recipe)
            kept = math.ceil((1 - ratio) * tokens)
            theory = layers * kv_heads * kept * 2 * head_dim * model.dtype.itemsize
            excess = cache.nbytes() / theory
            worst = max(worst, abs(excess - 1))
            table.add_row(
                str(recipe),
                str(kept),
                f"{cache.nbytes():,}",
                f"{theory:,}",
                f"{excess:.4f}",
                "yes" if abs(excess - 1) <= 0.05 else "[red]NO[/]",
            )
    Console(width=140).print(table)
    print(f"largest deviation from the theoretical budget: {worst:.2%} (target <= 5%)")


if __name__ == "__main__":
    main()
