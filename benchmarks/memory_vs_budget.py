"""Real bytes held vs the theoretical bytes of each recipe, on the ~1k-token demo context.

Eviction: theory = layers x KV heads x ceil((1 - ratio) x context tokens) x (key + value dims)
x dtype size — an ideal cache keeping exactly the budget. Quantization (KIVI): theory = packed
codes + 16-bit per-group key scales/minimums + 16-bit per-token value scales/minimums + the 16-bit
recent window (+ int32 slot indices once tokens were evicted). Real bytes are ``cache.nbytes()``:
every tensor held. Target: within 5%. Compression is shown against the model's fp32 cache and
against a 16-bit cache (how the papers state it).
"""

from __future__ import annotations

import math

import torch
from common import model_and_context, timed_prefill
from rich.console import Console
from rich.table import Table

from kvsqueeze import Recipe
from kvsqueeze.models import kv_cache_spec
from kvsqueeze.scorers import SCORERS

RATIOS = (0.5, 0.75, 0.9)
QUANTIZED = (
    "kivi2",
    "kivi4",
    "snapkv+kivi2@0.5",
    "snapkv+kivi2@0.75",
    "snapkv+kivi4@0.75",
    "snapkv+kivi2@0.9",
)


def kivi_bytes(recipe: Recipe, kept: int, head_dim: int, evicted: bool) -> int:
    """Bytes one KV head holds under KIVI for ``kept`` tokens (full groups, one-shot prefill)."""
    quantizer = recipe.quantizer
    quantized = max(kept - quantizer.residual, 0) // quantizer.group_size * quantizer.group_size
    recent = kept - quantized
    value_groups = head_dim // quantizer.group_size if head_dim % quantizer.group_size == 0 else 1
    codes = 2 * quantized * head_dim * quantizer.bits // 8
    key_scales = 2 * (quantized // quantizer.group_size) * head_dim * 2
    value_scales = 2 * quantized * value_groups * 2
    window = 2 * recent * head_dim * 2
    return codes + key_scales + value_scales + window + (4 * kept if evicted else 0)


def main() -> None:
    model, _, ids = model_and_context()
    layers, kv_heads, head_dim = kv_cache_spec(model.config)
    tokens = ids.shape[1]
    recipes = [Recipe.parse(f"{name}@{ratio}") for name in SCORERS for ratio in RATIOS]
    recipes += [Recipe.parse(text) for text in QUANTIZED]
    table = Table(title=f"real vs theoretical KV bytes, {tokens}-token context, model in {model.dtype}")
    columns = ("recipe", "kept / head", "real bytes", "theoretical", "real / theory", "vs fp32", "vs 16-bit")
    for column in columns:
        table.add_column(column, justify="right")
    worst = 0.0
    for recipe in recipes:
        cache, _ = timed_prefill(model, ids, recipe)
        kept = math.ceil((1 - recipe.ratio) * tokens)
        if recipe.quantizer is None:
            per_head = kept * 2 * head_dim * model.dtype.itemsize
        else:
            per_head = kivi_bytes(recipe, kept, head_dim, evicted=recipe.evicts)
        theory = layers * kv_heads * per_head
        excess = cache.nbytes() / theory
        worst = max(worst, abs(excess - 1))
        fp32, fp16 = cache.nbytes_full(), cache.nbytes_full(torch.float16)
        table.add_row(
            str(recipe),
            str(kept),
            f"{cache.nbytes():,}",
            f"{theory:,}",
            f"{excess:.4f}",
            f"{fp32 / cache.nbytes():.1f}x",
            f"{fp16 / cache.nbytes():.1f}x",
        )
    Console(width=150).print(table)
    print(f"largest deviation from the theoretical bytes: {worst:.2%} (target <= 5%)")


if __name__ == "__main__":
    main()
