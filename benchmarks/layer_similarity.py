"""How alike adjacent layers' KV states are, per token and KV head: what ``minicache`` relies on.

MiniCache merges the keys and values of adjacent deep layers where their directions are close.
On the ~1k-token demo context, with the full cache, this prints for every pair of adjacent
full-attention layers the mean cosine similarity of a token's keys in both layers (per KV head,
post-RoPE as the cache stores them) and of its values, and the share of (head, token) pairs
MiniCache would merge with its default retention threshold (``minicache``: ``gamma`` 0.05 of each
head's range of angular distances).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import model_and_context, timed_prefill
from rich.console import Console
from rich.table import Table

from kvsqueeze import Recipe
from kvsqueeze.depth import MiniCache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="embedded model name or local path")
    args = parser.parse_args()
    model, tokenizer, ids = model_and_context(args.model)
    with torch.no_grad():
        cache, _ = timed_prefill(model, tokenizer, ids, Recipe.parse("full"))
    held = [layer.held_tokens(torch.float32) for layer in cache.layers]
    table = Table(title=f"adjacent layers, {ids.shape[1]} context tokens, mean over KV heads and tokens")
    for column in ("layers", "key cosine", "value cosine", "merged at gamma 0.05"):
        table.add_column(column, justify="right")
    default = MiniCache()
    for lower in range(len(held) - 1):
        if cache.layers[lower].window is not None or cache.layers[lower + 1].window is not None:
            continue
        upper = held[lower + 1]
        key_cosine = F.cosine_similarity(held[lower].keys, upper.keys, dim=-1).mean()
        value_cosine = F.cosine_similarity(held[lower].values, upper.values, dim=-1).mean()
        candidates = torch.ones(upper.keys.shape[:3], dtype=torch.bool)
        merged = default.merge(
            (held[lower].keys, held[lower].values), (upper.keys, upper.values), candidates
        )[-1]
        table.add_row(
            f"{lower}-{lower + 1}", f"{key_cosine:.3f}", f"{value_cosine:.3f}", f"{merged.float().mean():.1%}"
        )
    Console().print(table)


if __name__ == "__main__":
    main()
