"""Prefill time of ``kvzap+global@0.75`` vs ``kvzip+global@0.75`` vs ``full``, side by side.

The demo document's ~1k-token context on the default model (or, with ``--tokens N``, the first N
tokens of the standard library's docstring prose, text no eval task uses), one forward (as
``prefill_overhead``) and chunked as the server feeds it (``DEFAULT_CHUNK_SIZE``); the three
recipes are timed in turn, ``REPEATS`` rounds, medians and the ratio to ``full``'s median of the
same rows are printed. Then how many of the (layer, KV head, token) entries KVzip keeps ``kvzap``
keeps too (a random choice of the same size would share about its size: a quarter).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from common import model_and_context
from rich.console import Console
from rich.table import Table

from kvsqueeze import CompressedCache, Recipe
from kvsqueeze.calibration_text import docstring_paragraphs
from kvsqueeze.engine import prefill_context
from kvsqueeze.prefill import DEFAULT_CHUNK_SIZE

REPEATS = 3
RECIPES = ("full", "kvzap+global@0.75", "kvzip+global@0.75")


def timed(model, tokenizer, ids: torch.Tensor, recipe: str, chunk: int | None):
    """A fresh cache of ``recipe`` after prefilling ``ids`` in ``chunk``-token forwards, and seconds."""
    cache = CompressedCache(Recipe.parse(recipe), config=model.config)
    start = time.perf_counter()
    prefill_context(model, tokenizer, cache, ids, torch.ones_like(ids), chunk)
    return cache, time.perf_counter() - start


def kept(cache: CompressedCache) -> set[tuple[int, int, int]]:
    """``(layer, KV head, slot)`` of every held token."""
    out = set()
    for index, layer in enumerate(cache.layers):
        slots = layer.view().slots[0]
        for head, row in enumerate(slots.tolist()):
            out.update((index, head, slot) for slot in row if slot >= 0)
    return out


def docstring_context(tokenizer, tokens: int, device: torch.device) -> torch.Tensor:
    """``[1, tokens]`` ids of the docstring prose, paragraphs in file order."""
    ids: list[int] = []
    for paragraph in docstring_paragraphs():
        ids += tokenizer.encode(paragraph + "\n\n", add_special_tokens=False)
        if len(ids) >= tokens:
            return torch.tensor([ids[:tokens]], device=device)
    raise ValueError(f"the docstring prose has only {len(ids)} tokens, fewer than --tokens {tokens}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, help="context length (default: the demo document, ~1k)")
    args = parser.parse_args()
    if args.tokens is not None and args.tokens < 2 * DEFAULT_CHUNK_SIZE:
        sys.exit(f"error: --tokens must be at least {2 * DEFAULT_CHUNK_SIZE} (two prefill chunks)")
    model, tokenizer, ids = model_and_context()
    if args.tokens is not None:
        ids = docstring_context(tokenizer, args.tokens, model.device)
    timed(model, tokenizer, ids, "full", None)  # warm-up
    table = Table(title=f"prefill of {ids.shape[1]} context tokens, median of {REPEATS} interleaved rounds")
    for column in ("recipe", "chunk", "seconds (runs)", "vs full", "KV bytes held"):
        table.add_column(column, justify="right")
    caches = {}
    for chunk in (None, DEFAULT_CHUNK_SIZE):
        times: dict[str, list[float]] = {recipe: [] for recipe in RECIPES}
        for _ in range(REPEATS):
            for recipe in RECIPES:
                caches[recipe, chunk], seconds = timed(model, tokenizer, ids, recipe, chunk)
                times[recipe].append(seconds)
        full = statistics.median(times["full"])
        for recipe in RECIPES:
            median = statistics.median(times[recipe])
            runs = ", ".join(f"{t:.2f}" for t in times[recipe])
            table.add_row(
                recipe,
                str(chunk or "one forward"),
                f"{median:.2f} ({runs})",
                f"{median / full:.2f}x",
                f"{caches[recipe, chunk].nbytes():,}",
            )
    console = Console(width=140)
    console.print(table)
    teacher = kept(caches["kvzip+global@0.75", None])
    for chunk in (None, DEFAULT_CHUNK_SIZE):
        student = kept(caches["kvzap+global@0.75", chunk])
        share = len(student & teacher) / len(teacher)
        console.print(
            f"kvzap+global@0.75 (chunk {chunk or 'one forward'}) keeps {share:.1%} of the {len(teacher):,} "
            f"(layer, head, token) entries kvzip+global@0.75 keeps (it holds {len(student):,})"
        )


if __name__ == "__main__":
    main()
