"""Decode-time compression: a recipe's decoding component bounds the cache while tokens are generated."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import padded_batch, tiny_model

from kvsqueeze import CompressedCache, Recipe, install
from kvsqueeze.engine import decode_step
from kvsqueeze.prefill import positions_from_mask
from kvsqueeze.recipe import RecipeError

PROMPT = 40


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return install(tiny_model("llama"))


@torch.no_grad()
def run(model, recipe: str, steps: int, lengths=(PROMPT,), arch_model=None):
    """Prefill a random prompt per row, then decode ``steps`` greedy tokens one forward at a time.

    Returns the cache and, after every step, ``[B, layers, Hkv]`` tokens held per head and
    ``nbytes()``."""
    model = arch_model or model
    cache = CompressedCache(Recipe.parse(recipe), config=model.config)
    ids, mask = padded_batch(list(lengths), seed=3)
    out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    logits, positions = out.logits[:, -1], positions_from_mask(mask)[:, -1:]
    held, sizes = [], []
    for _ in range(steps):
        logits, mask, positions = decode_step(model, cache, logits.argmax(-1), mask, positions)
        held.append(torch.stack([layer.held_lengths() for layer in cache.layers], dim=1))
        sizes.append(cache.nbytes())
    return cache, held, sizes


def held_slots(cache: CompressedCache, layer: int = 0, row: int = 0, head: int = 0) -> list[int]:
    slots = cache.layers[layer].view().slots[row, head]
    return sorted(slots[slots >= 0].tolist())


def test_a_budget_bounds_every_head_between_compressions(model):
    cache, held, _ = run(model, "decode:budget=16,every=4", steps=60)
    assert int(held[2].max()) == PROMPT + 3  # nothing evicted before the first compression
    assert all(int(h.max()) <= 16 + 4 for h in held[4:])
    assert int(held[-1].min()) >= 16  # compressions keep the budget, not fewer
    assert cache.decode_steps == 60


def test_frozen_keeps_the_whole_prompt_and_budgets_the_generated_tokens(model):
    cache, held, _ = run(model, "decode:budget=8,every=4,frozen=true", steps=40)
    assert set(range(PROMPT)) <= set(held_slots(cache))
    assert all(int(h.max()) <= PROMPT + 8 + 4 for h in held)
    assert int(held[-1].max()) > PROMPT  # generated tokens are still held


def test_keep_holds_a_fraction_of_the_generated_tokens(model):
    steps, every = 64, 8
    _, held, _ = run(model, f"decode:keep=0.25,every={every},frozen=true", steps=steps)
    for step in range(every, steps + 1, every):  # right after each compression
        assert int(held[step - 1].max()) == PROMPT + math.ceil(0.25 * step)


def test_the_decoding_scorer_decides_what_is_kept(model):
    """StreamingLLM during decoding keeps the most recent generated tokens; TOVA keeps others."""
    recent, _, _ = run(model, "decode:scorer=streaming,budget=8,every=8,frozen=true", steps=32)
    seen = recent.get_seq_length()
    assert held_slots(recent)[PROMPT:] == list(range(seen - 8, seen))
    tova, _, _ = run(model, "decode:scorer=tova,budget=8,every=8,frozen=true", steps=32)
    assert held_slots(tova)[PROMPT:] != list(range(seen - 8, seen))


def test_a_budget_never_reached_changes_nothing(model):
    bounded, _, _ = run(model, "snapkv@0.5+decode:budget=500,every=4", steps=20)
    plain, _, _ = run(model, "snapkv@0.5", steps=20)
    assert bounded.tokens_kept() == plain.tokens_kept()
    assert [held_slots(bounded, layer=1, head=h) for h in (0, 1)] == [
        held_slots(plain, layer=1, head=h) for h in (0, 1)
    ]


def test_decoding_composes_with_prefill_eviction_and_quantization(model):
    cache, held, sizes = run(model, "snapkv+kivi2@0.5+decode:budget=40,every=8", steps=48)
    assert int(held[0].max()) == PROMPT // 2 + 1
    assert all(int(h.max()) <= 40 + 8 for h in held)
    assert cache.nbytes_peak >= max(sizes) > cache.nbytes() * 0.5


def test_padding_is_dropped_first_and_each_row_counts_its_own_tokens(model):
    cache, held, _ = run(model, "decode:keep=0.5,every=4", steps=24, lengths=(PROMPT, PROMPT - 20))
    for row, (tokens, padding) in enumerate([(PROMPT + 24, 0), (PROMPT - 20 + 24, 20)]):
        assert int(held[-1][row].max()) == math.ceil(0.5 * tokens)
        assert min(held_slots(cache, row=row)) >= padding


def test_peak_bytes_are_the_largest_held_before_a_compression(model):
    cache, _, sizes = run(model, "decode:budget=16,every=8", steps=40)
    assert cache.nbytes_peak >= max(sizes)
    assert cache.nbytes() < cache.nbytes_peak


def test_generate_with_a_bounded_cache(model):
    cache = CompressedCache(Recipe.parse("decode:budget=12,every=4"), config=model.config)
    ids, mask = padded_batch([30], seed=5)
    out = model.generate(
        input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=25, do_sample=False
    )
    assert out.shape[1] == 30 + 25
    assert int(max(layer.held_lengths().max() for layer in cache.layers)) <= 12 + 4
    assert cache.decode_steps == 24  # the first new token comes from the prefill forward


def test_stack_and_split_carry_where_each_row_started_decoding(model):
    first, _, _ = run(model, "decode:budget=16,every=4", steps=6)
    second = CompressedCache(Recipe.parse("decode:budget=16,every=4"), config=model.config)
    ids, mask = padded_batch([20], seed=9)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=second, use_cache=True)
    stacked = CompressedCache.stack([first, second])
    assert stacked.decode_start.tolist() == [PROMPT, -1]
    back = stacked.split()
    assert back[0].decode_start.tolist() == [PROMPT] and back[1].decode_start.tolist() == [-1]


@pytest.mark.parametrize(
    "text",
    [
        "kvzip+global@0.75+decode:budget=256,every=32",
        "snapkv@0.5+decode:scorer=streaming,keep=0.25,frozen=True",
        "decode:budget=64",
    ],
)
def test_recipe_string_round_trip(text):
    recipe = Recipe.parse(text)
    assert recipe.decoding is not None and not recipe.is_full
    assert str(Recipe.parse(str(recipe))) == str(recipe)


def test_ratio_may_close_the_prefill_part_or_the_whole_recipe():
    assert str(Recipe.parse("snapkv+decode:budget=8@0.5")) == "snapkv@0.5+decode:budget=8"
    with pytest.raises(RecipeError, match="two ratios"):
        Recipe.parse("snapkv@0.5+decode:budget=8@0.5")
    with pytest.raises(RecipeError, match="decode:scorer must be one of"):
        Recipe.parse("decode:scorer=kvzip")


@pytest.mark.parametrize(
    "recipe", ["decode:budget=16,every=4", "decode:keep=0.25,every=8,frozen=true", "decode:keep=0.5,every=4"]
)
def test_most_held_bounds_what_a_head_holds_and_is_reached(model, recipe):
    steps = 48
    _, held, _ = run(model, recipe, steps=steps)
    bound = Recipe.parse(recipe).decoding.most_held(PROMPT, PROMPT, steps)
    observed = max(int(h.max()) for h in held)
    assert observed <= bound <= observed + 8
