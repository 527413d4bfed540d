"""Real bytes held vs the theoretical bytes of each recipe, on the ~1k-token demo context.

Two theories per recipe. *Ideal*: exactly the budget, token by token — eviction: layers x KV
heads x ceil((1 - ratio) x context tokens) x (key + value dims) x dtype size; quantization (KIVI):
packed codes + 16-bit per-group key scales/minimums + 16-bit per-token value scales/minimums +
the 16-bit recent window (+ int32 slot indices once tokens were evicted); GEAR adds its outliers
(16-bit value + uint8 index), 16-bit low-rank rows per token and bases per group; ``mixed`` has a
high and a low tier; a key reducer stores fewer key numbers per encoded block (ThinK: the kept
channels + a uint8 index each, and a float32 query norm per channel and head; low-rank keys:
``rank`` coefficients per token + a 16-bit ``rank x head_dim`` basis per block), in 16 bits when
there is no quantizer; ``minicache:gamma=1`` merges every token of each pair of layers it pairs, so
the deeper layer holds none and its host two 16-bit magnitudes per token more. *Paged*: the same
content in whole blocks (16-token blocks in the model's dtype, quantizer groups as blocks, a head's
last block partly filled), plus an int64 table entry per block and an int64 count per head and
tier. Real bytes are ``cache.nbytes()``: every tensor held. Target: within 5% of the paged theory;
real / ideal is what paging costs. Compression is shown against the model's fp32 cache and, for a
16-bit deployment, ``nbytes(torch.float16)`` against a 16-bit cache (how the papers state it).
"""

from __future__ import annotations

import math

import torch
from common import model_and_context, timed_prefill
from rich.console import Console
from rich.table import Table

from kvsqueeze import Recipe
from kvsqueeze.keys import LowRankKeys, ThinK
from kvsqueeze.keys.base import PlainBlocks
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
    "think",
    "lowrank",
    "snapkv+think@0.75",
    "snapkv+think+kivi4@0.75",
    "snapkv+lowrank+kivi4@0.75",
    "kvzip+think+kivi2@0.75",
)
CROSS_LAYER = ("minicache:gamma=1",)


def kivi_tier_bytes(quantizer: KIVI, quantized: int, head_dim: int, key_dim: int | None = None) -> int:
    """Codes and 16-bit scales/minimums of ``quantized`` tokens of one head (KIVI layout), keys
    of ``key_dim`` numbers (``head_dim`` unless a key reducer shrank them)."""
    key_dim = head_dim if key_dim is None else key_dim
    groups = math.ceil(quantized / quantizer.group_size)
    value_size = quantizer.value_group_size or quantizer.group_size
    value_groups = head_dim // value_size if head_dim % value_size == 0 else 1
    codes = quantized * (key_dim + head_dim) * quantizer.bits // 8
    key_scales = 2 * groups * key_dim * 2
    value_scales = 2 * quantized * value_groups * 2
    corrections = 0
    if isinstance(quantizer, GEAR):  # 16-bit outlier + uint8 index, 16-bit low-rank rows and bases
        outliers = math.ceil(quantizer.outliers * head_dim)
        corrections = 2 * (
            quantized * (3 * outliers + 2 * quantizer.rank) + groups * quantizer.rank * head_dim * 2
        )
    return codes + key_scales + value_scales + corrections


def codec_tier_bytes(recipe: Recipe, codec, quantized: int, head_dim: int) -> int:
    """Bytes of ``quantized`` encoded tokens of one head: ``codec`` (a quantizer's tier, or
    ``PlainBlocks``) encodes keys the recipe's key reducer shrank, plus the reducer's side data."""
    reducer, groups = recipe.keys, math.ceil(quantized / codec.group_size)
    key_dim, side = head_dim, 0
    if isinstance(reducer, ThinK):
        key_dim = reducer.kept_channels(head_dim)
        side = groups * key_dim + 4 * head_dim  # a uint8 index per kept channel; the query norms
    elif isinstance(reducer, LowRankKeys):
        key_dim = min(reducer.rank, codec.group_size, head_dim)
        side = groups * key_dim * head_dim * 2
    if isinstance(codec, PlainBlocks):
        return quantized * (key_dim + head_dim) * 2 + side
    return kivi_tier_bytes(codec, quantized, head_dim, key_dim) + side


def whole_blocks(tokens: int, block: int) -> int:
    return math.ceil(tokens / block) * block


def encoded_tiers(recipe: Recipe, tokens: int, kept: int) -> list[tuple[object, int]]:
    """``(codec, encoded tokens)`` of each encoded tier of one head (one-shot prefill): the kept
    tokens age into the (high) tier in whole groups, the rest of ``residual`` stays 16-bit;
    ``mixed`` puts the ``tokens - kept`` the scorer drops in its low tier."""
    codecs = [PlainBlocks()] if recipe.quantizer is None else recipe.quantizer.tiers()
    aging = codecs[-1]
    quantized = max(kept - aging.residual, 0) // aging.group_size * aging.group_size
    if isinstance(recipe.quantizer, MixedPrecision):
        return [(codecs[0], tokens - kept), (aging, quantized)]
    return [(aging, quantized)]


def paged_bytes(recipe: Recipe, tokens: int, kept: int, head_dim: int, element: int) -> int:
    """Bytes one KV head holds in whole blocks (see module docstring), one-shot prefill: an int32
    slot per entry once tokens were evicted, a float32 running score for a stateful scorer."""
    slot = (4 if recipe.evicts else 0) + (4 if recipe.scorer is not None and recipe.scorer.stateful else 0)
    if not recipe.encodes_blocks:
        held = whole_blocks(kept, BLOCK)
        return held * (2 * head_dim * element + slot) + 8 * (held // BLOCK) + 8
    tiers = encoded_tiers(recipe, tokens, kept)
    dense_block = dense_block_size(BLOCK, [codec for codec, _ in tiers])
    dense = whole_blocks(kept - tiers[-1][1], dense_block)
    total = dense * (2 * head_dim * 2 + slot) + 8 * (dense // dense_block) + 8
    for codec, held in tiers:
        held = whole_blocks(held, codec.group_size)
        blocks = held // codec.group_size
        bookkeeping = blocks * (codec.group_size * slot + 16) + 16
        total += codec_tier_bytes(recipe, codec, held, head_dim) + bookkeeping
    return total


def encoded_bytes(recipe: Recipe, tokens: int, kept: int, head_dim: int) -> int:
    """Bytes one KV head holds with a quantizer or key reducer (one-shot prefill, no paging): the
    encoded tiers, the 16-bit window and int32 slots once anything moved. KVzip encodes after
    its reconstruction pass, so the same holds for it."""
    tiers = encoded_tiers(recipe, tokens, kept)
    window = 2 * (kept - tiers[-1][1]) * head_dim * 2
    body = sum(codec_tier_bytes(recipe, codec, held, head_dim) for codec, held in tiers)
    slots = 4 * tokens if isinstance(recipe.quantizer, MixedPrecision) else (4 * kept if recipe.evicts else 0)
    return body + window + slots


def cross_layer_bytes(recipe: Recipe, layers: int, per_head: int, tokens: int, paged: bool) -> int:
    """Bytes of one KV head summed over the layers with ``minicache:gamma=1``: ``per_head`` (what a
    full-cache layer holds) in every layer but the deeper one of each pair, which holds no token
    (an int64 count), plus two 16-bit magnitudes per token (per block position if ``paged``) in
    each host."""
    pairs = len(recipe.depth.pairs([None] * layers))
    magnitudes = 2 * 2 * (whole_blocks(tokens, BLOCK) if paged else tokens)
    return per_head * (layers - pairs) + pairs * (magnitudes + (8 if paged else 0))


def main() -> None:
    model, tokenizer, ids = model_and_context()
    layers, kv_heads, head_dim = kv_cache_spec(model.config)
    tokens = ids.shape[1]
    recipes = [Recipe.parse(f"{name}@{ratio}") for name in SCORERS for ratio in RATIOS]
    recipes += [Recipe.parse(text) for text in (*QUANTIZED, *CROSS_LAYER)]
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
        if not recipe.encodes_blocks:
            per_head = kept * 2 * head_dim * model.dtype.itemsize
        else:
            per_head = encoded_bytes(recipe, tokens, kept, head_dim)
        paged_head = paged_bytes(recipe, tokens, kept, head_dim, model.dtype.itemsize)
        ideal = layers * kv_heads * per_head
        paged = layers * kv_heads * paged_head + 16
        if recipe.depth is not None:
            ideal = kv_heads * cross_layer_bytes(recipe, layers, per_head, tokens, paged=False)
            paged = kv_heads * cross_layer_bytes(recipe, layers, paged_head, tokens, paged=True) + 16
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
