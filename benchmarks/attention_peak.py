"""KVzip's attention-peak statistic before and after issue 14, measured side by side in one run.

"before" is the former ``ScoringInputs.attention_peak``, copied here verbatim as the reference
(``old_attention_peak``): fp32 logits, a ``[B, Hkv, block, L]`` causal mask applied with
``masked_fill``, a softmax and ``nan_to_num`` over every query, then the max; and, like every
``attention_peak``, the statistic the attention function recorded over every query of the forward
(``inputs.observed``) when there is one, which is what KVzip scores with at compression time (its
compression step holds no queries). "after" is ``ScoringInputs.attention_peak``: one logsumexp per
query, the max over log-probabilities, one exponential per candidate, the causal comparison only
on the columns that need it. Two measurements, each "before" then "after":

1. the statistic alone on the shapes of a 2k-token reconstruction forward of the default model
   (3 KV heads x 3 query heads, head dim 64, ~2k context + 2k copy candidates, 2k queries);
2. a whole ``kvzip+global@0.75`` prefill of a 2k-token passkey context (reconstruction pass
   included), with the seconds spent in the statistic and whether both keep the same tokens.
"""

from __future__ import annotations

import math
import time
from unittest import mock

import torch

from kvsqueeze import CompressedCache, Recipe, install, load_model
from kvsqueeze.engine import prefill_context, split_prompt
from kvsqueeze.eval.tasks import make_sample
from kvsqueeze.scorers.base import ScoringInputs, inputs_from_tensors

BLOCK = 256
CONTEXT_TOKENS = 2048
RECIPE = "kvzip+global@0.75"


def old_attention_peak(inputs: ScoringInputs, last: int | None = None, block: int = BLOCK) -> torch.Tensor:
    """``ScoringInputs.attention_peak`` as it was before issue 14 (``attention(last).amax(3)`` in
    query blocks), the observed statistic included: without it, the compression step, which has
    no queries, would score every candidate 0."""
    if last is None and "attention_peak" in inputs.observed:
        return inputs.observed["attention_peak"]
    start = inputs._first_query(last)
    if start in inputs._probs_cache:
        return inputs._probs_cache[start].amax(3)
    batch, kv_heads, length, dim = inputs.keys.shape
    keys = inputs.keys.float()
    queries = inputs.queries[:, :, start:].float().reshape(batch, kv_heads, inputs.n_rep, -1, dim)
    peak = torch.zeros(batch, kv_heads, inputs.n_rep, length, device=keys.device)
    for lo in range(0, queries.shape[3], block):
        logits = torch.einsum("bhrqd,bhld->bhrql", queries[:, :, :, lo : lo + block], keys) * inputs.scaling
        mask = inputs.query_mask(start + lo, start + lo + block)
        logits = logits.masked_fill(~mask[:, :, None], -math.inf)
        peak = torch.maximum(peak, torch.softmax(logits, dim=-1).nan_to_num(0.0).amax(3))
    return peak


def seconds(function, repeats: int = 3) -> float:
    """Best of ``repeats`` wall-clock runs of ``function()``."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def statistic_alone() -> None:
    generator = torch.Generator().manual_seed(0)
    context, copy = CONTEXT_TOKENS + 24, CONTEXT_TOKENS
    keys = torch.randn(1, 3, context + copy, 64, generator=generator)
    queries = torch.randn(1, 9, copy, 64, generator=generator)
    inputs = inputs_from_tensors(keys, queries)
    before = seconds(lambda: old_attention_peak(inputs))
    after = seconds(lambda: inputs.attention_peak())
    error = (old_attention_peak(inputs) - inputs.attention_peak()).abs().max().item()
    print(f"statistic alone, {copy} queries x {context + copy} candidates: before {before:.2f} s, "
          f"after {after:.2f} s ({before / after:.1f}x), max |diff| {error:.1e}")  # fmt: skip


def timed_kvzip_prefill(model, tokenizer, ids: torch.Tensor, peak) -> tuple[CompressedCache, float, float]:
    """Prefill ``ids`` under ``RECIPE`` with ``peak`` as the statistic: cache, total s, statistic s."""
    spent = [0.0]

    def timed_peak(inputs: ScoringInputs, *args, **kwargs) -> torch.Tensor:
        start = time.perf_counter()
        result = peak(inputs, *args, **kwargs)
        spent[0] += time.perf_counter() - start
        return result

    cache = CompressedCache(Recipe.parse(RECIPE))
    with mock.patch.object(ScoringInputs, "attention_peak", timed_peak):
        start = time.perf_counter()
        prefill_context(model, tokenizer, cache, ids, torch.ones_like(ids))
        total = time.perf_counter() - start
    return cache, total, spent[0]


def checked_peak(errors: list[float]):
    """``ScoringInputs.attention_peak`` that also computes ``old_attention_peak`` on every call of
    the forward (the compression step's calls return the observed statistic) and records the
    largest difference in ``errors``."""
    current = ScoringInputs.attention_peak  # bound now: the prefill patches the class attribute

    def peak(inputs: ScoringInputs, *args, **kwargs) -> torch.Tensor:
        result = current(inputs, *args, **kwargs)
        if not inputs.observed:
            errors.append((result - old_attention_peak(inputs, *args, **kwargs)).abs().max().item())
        return result

    return peak


def whole_prefill() -> None:
    model, tokenizer = load_model()
    install(model)
    sample = make_sample(tokenizer, "passkey", CONTEXT_TOKENS, 0)
    context_text, _ = split_prompt(tokenizer, sample.context, sample.questions[0])
    ids = torch.tensor([tokenizer.encode(context_text, add_special_tokens=False)])
    timed_kvzip_prefill(model, tokenizer, ids[:, :256], ScoringInputs.attention_peak)  # warm-up
    runs = {
        "before": timed_kvzip_prefill(model, tokenizer, ids, old_attention_peak),
        "after": timed_kvzip_prefill(model, tokenizer, ids, ScoringInputs.attention_peak),
    }
    for name, (_, total, statistic) in runs.items():
        print(f"{RECIPE} prefill, {ids.shape[1]} context tokens, {name}: {total:.1f} s, "
              f"statistic {statistic:.1f} s ({statistic / total:.0%})")  # fmt: skip
    before, after = (kept(cache) for cache, _, _ in runs.values())
    print(f"tokens kept: before {len(before)}, after {len(after)}, kept by only one: {len(before ^ after)}; "
          f"bytes held: before {runs['before'][0].nbytes()}, after {runs['after'][0].nbytes()}")  # fmt: skip
    errors: list[float] = []
    timed_kvzip_prefill(model, tokenizer, ids, checked_peak(errors))
    calls = f"each of the {len(errors)} forward calls"
    print(f"statistic, after vs before, on {calls}: max |diff| {max(errors):.1e}")


def kept(cache: CompressedCache) -> set[tuple[int, int, int, int]]:
    """``(layer, row, KV head, slot)`` of every token the cache holds."""
    held = set()
    for index, layer in enumerate(cache.layers):
        slots = layer.held_tokens(torch.float32).slots
        for (row, head, _), slot in zip(
            torch.nonzero(slots >= 0).tolist(), slots[slots >= 0].tolist(), strict=True
        ):
            held.add((index, row, head, slot))
    return held


if __name__ == "__main__":
    torch.set_num_threads(2)
    statistic_alone()
    whole_prefill()
