"""Shared set-up for the benchmark scripts: the default model and the demo document's context."""

from __future__ import annotations

import time

import torch

from kvsqueeze import CompressedCache, Recipe, install, load_model
from kvsqueeze.demo import demo_case
from kvsqueeze.engine import prefill_context, split_prompt


def model_and_context(name: str = "smollm2-135m"):
    """The model (kvsqueeze attention installed), its tokenizer and the demo context ids ``[1, n]``."""
    model, tokenizer = load_model(name)
    install(model)
    case = demo_case()
    context_text, _ = split_prompt(tokenizer, case.context, case.question)
    ids = torch.tensor([tokenizer.encode(context_text, add_special_tokens=False)], device=model.device)
    return model, tokenizer, ids


def timed_prefill(model, tokenizer, ids: torch.Tensor, recipe: Recipe) -> tuple[CompressedCache, float]:
    """Prefill the context ``ids`` into a fresh cache compressed by ``recipe`` as the engine does
    (KVzip's reconstruction pass included); returns the cache and seconds."""
    cache = CompressedCache(recipe)
    start = time.perf_counter()
    prefill_context(model, tokenizer, cache, ids, torch.ones_like(ids))
    return cache, time.perf_counter() - start
