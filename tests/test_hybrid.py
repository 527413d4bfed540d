"""Hybrid sliding/global attention (Gemma 3) with compression, on a tiny random Gemma 3."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny_model
from transformers import DynamicCache

from kvsqueeze import CompressedCache, install
from kvsqueeze.baseline import transformers_cache_bytes
from kvsqueeze.compat import rope_inverse_frequencies
from kvsqueeze.engine import generate, prefill, prefill_context, split_prompt
from kvsqueeze.recipe import Recipe
from kvsqueeze.scorers.expected import ExpectedAttention

CONTEXT = "The pass key is 12345. Remember it. " + "The grass is green. The sky is blue. " * 12
WINDOW = 16


@pytest.fixture(scope="module")
def gemma(tokenizer):
    """Tiny Gemma 3 (layers: sliding, sliding, full, sliding; window 16) over the real vocabulary."""
    model = tiny_model(
        "gemma3", vocab_size=len(tokenizer), max_position_embeddings=4096, sliding_window=WINDOW
    )
    install(model)
    return model, tokenizer


def _context_ids(tokenizer) -> torch.Tensor:
    text, _ = split_prompt(tokenizer, CONTEXT, "What is the pass key?")
    return torch.tensor([tokenizer.encode(text, add_special_tokens=False)])


def _held(cache: CompressedCache) -> list[int]:
    return [int(layer.held_lengths().max()) for layer in cache.layers]


def test_rope_frequencies_follow_the_layer_type(gemma):
    model, _ = gemma
    config, rotary = model.config, model.model.rotary_emb
    sliding = rope_inverse_frequencies(config, "sliding_attention")
    full = rope_inverse_frequencies(config, "full_attention")
    assert not torch.allclose(sliding, full)
    cache = CompressedCache(config=config)
    for index, layer_type in enumerate(config.layer_types):
        expected = getattr(rotary, f"{layer_type}_inv_freq")
        torch.testing.assert_close(cache.rope_inv_freq(torch.device("cpu"), index), expected)


def test_expected_attention_scores_each_layer_with_its_rope(gemma, monkeypatch):
    model, tokenizer = gemma
    seen: dict[int, torch.Tensor] = {}
    original = ExpectedAttention.score

    def recording(self, inputs):
        seen[inputs.layer_idx] = inputs.rope_inv_freq
        return original(self, inputs)

    monkeypatch.setattr(ExpectedAttention, "score", recording)
    ids = _context_ids(tokenizer)
    cache = CompressedCache(Recipe.parse("expected+sliding@0.5"), config=model.config)
    with torch.no_grad():
        prefill(model, cache, ids, torch.ones_like(ids))
    assert sorted(seen) == [0, 1, 2, 3]
    for index, layer_type in enumerate(model.config.layer_types):
        torch.testing.assert_close(seen[index], getattr(model.model.rotary_emb, f"{layer_type}_inv_freq"))


@pytest.mark.parametrize("recipe", ["snapkv@0.5", "expected@0.5", "kvzip@0.5", "kvzip+global@0.5"])
def test_recipes_compress_the_full_layers_and_keep_the_windows(gemma, recipe):
    model, tokenizer = gemma
    ids = _context_ids(tokenizer)
    full = CompressedCache(config=model.config)
    compressed = CompressedCache(Recipe.parse(recipe), model.config)
    with torch.no_grad():
        prefill(model, full, ids, torch.ones_like(ids))
        prefill_context(model, tokenizer, compressed, ids, torch.ones_like(ids))
    held, baseline = _held(compressed), _held(full)
    assert compressed.get_seq_length() == ids.shape[1]
    for index, layer_type in enumerate(model.config.layer_types):
        if layer_type == "sliding_attention":
            assert held[index] == baseline[index] < WINDOW + compressed.block_size
        else:
            heads = model.config.num_key_value_heads
            assert baseline[index] == ids.shape[1]
            assert compressed.layers[index].tokens_kept() <= heads * (0.5 * ids.shape[1] + 1)


def test_kvzip_reconstruction_restores_the_sliding_windows(gemma):
    """KVzip's copy pass (fed, then cropped off) pushes the context out of a sliding window; the
    sliding layers must end up holding exactly the tokens a plain prefill leaves there."""
    model, tokenizer = gemma
    ids = _context_ids(tokenizer)
    caches = [CompressedCache(Recipe.parse(r), model.config) for r in ("full", "kvzip@0.5")]
    with torch.no_grad():
        for cache in caches:
            prefill_context(model, tokenizer, cache, ids, torch.ones_like(ids))
    full, kvzip = caches
    assert not kvzip.record_past and not any(layer.record_past for layer in kvzip.layers)
    for index, layer_type in enumerate(model.config.layer_types):
        if layer_type == "sliding_attention":
            ours, reference = kvzip.layers[index].view(), full.layers[index].view()
            assert torch.equal(ours.slots, reference.slots)
            torch.testing.assert_close(ours.keys, reference.keys, atol=1e-6, rtol=0)
            torch.testing.assert_close(ours.values, reference.values, atol=1e-6, rtol=0)


def test_full_holds_what_dynamic_cache_holds_up_to_block_slack(gemma):
    model, tokenizer = gemma
    ids = _context_ids(tokenizer)
    ours, theirs = CompressedCache(Recipe.parse("full"), model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        prefill(model, ours, ids, torch.ones_like(ids), chunk_size=32)
        model(input_ids=ids, past_key_values=theirs)
    held_by_dynamic = [layer.keys.shape[2] for layer in theirs.layers]
    assert held_by_dynamic == [WINDOW - 1, WINDOW - 1, ids.shape[1], WINDOW - 1]
    # whole blocks: a sliding layer's first block may start before its window, a tail block is open
    for held, dynamic in zip(_held(ours), held_by_dynamic, strict=True):
        assert dynamic <= held < dynamic + 2 * ours.block_size
    baseline = transformers_cache_bytes(model.config, ids.shape[1])
    assert ours.nbytes_full() == baseline
    per_token = 2 * model.config.num_key_value_heads * model.config.head_dim * 4
    slack = ours.nbytes() - baseline
    assert 0 <= slack < len(ours.layers) * 2 * ours.block_size * per_token


@pytest.mark.parametrize(
    ("recipe", "compressed"),
    [("full", []), ("snapkv@0.5", [2]), ("kivi4", [2]), ("snapkv+sliding@0.5", [0, 1, 2, 3])],
)
def test_results_name_the_layers_the_recipe_compressed(gemma, recipe, compressed):
    model, tokenizer = gemma
    result = generate(model, tokenizer, CONTEXT, "What is the pass key?", recipe, max_new_tokens=2)
    assert result.layers == 4
    assert result.compressed_layers == compressed  # the sliding layers keep their window as they are


@pytest.mark.parametrize("recipe", ["snapkv+sliding@0.5", "snapkv+global+sliding@0.5"])
def test_a_sliding_layers_ratio_is_a_fraction_of_its_window(gemma, recipe):
    """With ``sliding``, a sliding layer keeps half of the ``window - 1`` tokens the full cache
    holds, not half of the context (more than its window): uniformly, or as a share of the same
    total with ``global``."""
    model, tokenizer = gemma
    ids = _context_ids(tokenizer)
    context = ids.shape[1]
    assert context > 4 * WINDOW
    cache = CompressedCache(Recipe.parse(recipe), config=model.config)
    with torch.no_grad():
        prefill_context(model, tokenizer, cache, ids, torch.ones_like(ids))
    held = torch.stack([layer.held_lengths() for layer in cache.layers])  # [layers, B, Hkv]
    heads = held[0].numel()
    sliding = [i for i, layer in enumerate(cache.layers) if layer.window is not None]
    assert sliding == [0, 1, 3]
    per_head = {
        i: math.ceil(0.5 * (WINDOW - 1)) if i in sliding else math.ceil(0.5 * context) for i in range(4)
    }
    assert int(held.sum()) == heads * sum(per_head.values())
    if "global" not in recipe:
        assert all(bool((held[i] == per_head[i]).all()) for i in range(4))
