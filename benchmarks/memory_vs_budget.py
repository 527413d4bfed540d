"""Real bytes held vs the theoretical bytes of each recipe, on the ~1k-token demo context.

Two theories per recipe. *Ideal*: exactly the budget, token by token — eviction: layers x KV
heads x ceil((1 - ratio) x context tokens) x (key + value dims) x dtype size; quantization (KIVI):
packed codes + 16-bit per-group key scales/minimums + 16-bit per-token value scales/minimums +
the 16-bit recent window (+ int32 slot indices once tokens were evicted); GEAR adds its outliers
(16-bit value + uint8 index), 16-bit low-rank rows per token and bases per group; ``mixed`` has a
high and a low tier. *Paged*: the same content in whole blocks (16-token blocks in the model's
dtype, quantizer groups as blocks, a head's last block partly filled), plus an int64 table entry
per block and an int64 count per head and tier. Real bytes are ``cache.nbytes()``: every tensor
held. Target: within 5% of the paged theory; real / ideal is what paging costs. Compression is
shown against the model's fp32 cache and, for a 16-bit deployment, ``nbytes(torch.float16)``
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
from kvsqueeze.quantizers import GEAR, MixedPrecision
from kvsqueeze.quantizers.kivi import KIVI
from kvsqueeze.scorers import SCORERS
from kvsqueeze.storage.layer import dense_block_size

BLOCK = 16
"""``CompressedCache``'s default block size."""

RATIOS = (0.5, 0.75, 0.9)
QUANTIZED = (
    "kivi2",
    "kivi4",
    "gear",
    "snapkv+kivi2@0.5",
    "snapkv+kivi2@0.75",
    "snapkv+kivi4@0.75",
    "snapkv+kivi2@0.9",
    "snapkv+gear@0.75",
    "snapkv+mixed@0.75",
    "snapkv+mixed@0.9",
    "kvzip+kivi4@0.75",
    "kvzip+words+kivi4@0.85",
)


def kivi_tier_bytes(quantizer: KIVI, quantized: int, head_dim: int) -> int:
    """Codes and 16-bit scales/minimums of ``quantized`` tokens of one head (KIVI layout)."""
    groups = math.ceil(quantized / quantizer.group_size)
    value_size = quantizer.value_group_size or quantizer.group_size
    value_groups = head_dim // value_size if head_dim % value_size == 0 else 1
    codes = 2 * quantized * head_dim * quantizer.bits // 8
    key_scales = 2 * groups * head_dim * 2
    value_scales = 2 * quantized * value_groups * 2
    corrections = 0
    if isinstance(quantizer, GEAR):  # 16-bit outlier + uint8 index, 16-bit low-rank rows and bases
        outliers = math.ceil(quantizer.outliers * head_dim)
        corrections = 2 * (
            quantized * (3 * outliers + 2 * quantizer.rank) + groups * quantizer.rank * head_dim * 2
        )
    return codes + key_scales + value_scales + corrections


def whole_blocks(tokens: int, block: int) -> int:
    return math.ceil(tokens / block) * block


def paged_bytes(recipe: Recipe, tokens: int, kept: int, head_dim: int, element: int) -> int:
    """Bytes one KV head holds in whole blocks (see module docstring), one-shot prefill: an int32
    slot per entry once tokens were evicted, a float32 running score for a stateful scorer."""
    slot = (4 if recipe.evicts else 0) + (4 if recipe.scorer is not None and recipe.scorer.stateful else 0)
    quantizer = recipe.quantizer
    if quantizer is None:
        held = whole_blocks(kept, BLOCK)
        return held * (2 * head_dim * element + slot) + 8 * (held // BLOCK) + 8
    group, dense_block = quantizer.group_size, dense_block_size(BLOCK, [quantizer])
    quantized = max(kept - quantizer.residual, 0) // group * group
    dense = whole_blocks(kept - quantized, dense_block)
    total = dense * (2 * head_dim * 2 + slot) + 8 * (dense // dense_block) + 8
    tiers = [(quantizer, quantized)]
    if isinstance(quantizer, MixedPrecision):
        tiers = [(quantizer.low, whole_blocks(tokens - kept, group)), (quantizer.high, quantized)]
    for tier, held in tiers:
        blocks = held // tier.group_size
        total += kivi_tier_bytes(tier, held, head_dim) + blocks * (tier.group_size * slot + 16) + 16
    return total


def quantized_bytes(recipe: Recipe, tokens: int, kept: int, head_dim: int) -> int:
    """Bytes one KV head holds with a quantizer (one-shot prefill): the tokens kept age into the
    (high) tier in whole groups, the rest of ``residual`` stays 16-bit; ``mixed`` puts the
    ``tokens - kept`` the scorer drops in its low tier; int32 slots once anything moved. KVzip
    quantizes after its reconstruction pass, so the same holds for it."""
    quantizer = recipe.quantizer
    quantized = max(kept - quantizer.residual, 0) // quantizer.group_size * quantizer.group_size
    window = 2 * (kept - quantized) * head_dim * 2
    if isinstance(quantizer, MixedPrecision):
        body = kivi_tier_bytes(quantizer.high, quantized, head_dim)
        body += kivi_tier_bytes(quantizer.low, tokens - kept, head_dim)
        return body + window + 4 * tokens
    body = kivi_tier_bytes(quantizer, quantized, head_dim)
    return body + window + (4 * kept if recipe.evicts else 0)


def main() -> None:
    model, tokenizer, ids = model_and_context()
    layers, kv_heads, head_dim = kv_cache_spec(model.config)
    tokens = ids.shape[1]
    recipes = [Recipe.parse(f"{name}@{ratio}") for name in SCORERS for ratio in RATIOS]
    recipes += [Recipe.parse(text) for text in QUANTIZED]
    table = Table(title=f"real vs theoretical KV bytes, {tokens}-token context, model in {model.dtype}")
    columns = (
        "recipe",
        "kept / head",
        "real bytes",
        "paged theory",
        "real / paged",
        "real / ideal",
        "vs fp32",
        "vs 16-bit",
    )
    for column in columns:
        table.add_column(column, justify="right")
    worst = 0.0
    for recipe in recipes:
        cache, _ = timed_prefill(model, tokenizer, ids, recipe)
        kept = math.ceil((1 - recipe.ratio) * tokens)
        if recipe.quantizer is None:
            per_head = kept * 2 * head_dim * model.dtype.itemsize
        else:
            per_head = quantized_bytes(recipe, tokens, kept, head_dim)
        ideal = layers * kv_heads * per_head
        paged = layers * kv_heads * paged_bytes(recipe, tokens, kept, head_dim, model.dtype.itemsize) + 16
        excess = cache.nbytes() / paged
        worst = max(worst, abs(excess - 1))
        fp32, fp16 = cache.nbytes_full(), cache.nbytes_full(torch.float16)
        table.add_row(
            str(recipe),
            str(kept),
            f"{cache.nbytes():,}",
            f"{paged:,}",
            f"{excess:.4f}",
            f"{cache.nbytes() / ideal:.4f}",
            f"{fp32 / cache.nbytes():.1f}x",
            f"{fp16 / cache.nbytes(torch.float16):.1f}x",
        )
    Console(width=150).print(table)
    print(f"largest deviation from the paged theory: {worst:.2%} (target <= 5%)")


if __name__ == "__main__":
    main()
