"""Caches prefilled separately, stacked into one decode batch, split again, saved and restored."""

from __future__ import annotations

import pytest
import torch
from test_cache import fixed_recipe, held_block_bytes
from tiny_models import padded_batch, tiny_model

from kvsqueeze.attention import install
from kvsqueeze.cache import CompressedCache
from kvsqueeze.engine import prefill
from kvsqueeze.recipe import Recipe


def decode_steps(model, cache, first_tokens, positions, offsets, steps=3):
    """Greedy decode of a stacked batch: per-row positions, mask zero over each row's offset."""
    width = cache.get_seq_length()
    mask = (torch.arange(width)[None] >= offsets[:, None]).long()
    tokens, logits_seen = first_tokens, []
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        out = model(input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=cache)
        logits_seen.append(out.logits[:, -1])
        tokens, positions = out.logits[:, -1:].argmax(-1), positions + 1
    return torch.stack(logits_seen, 1)


def prefilled(model, length, seed, recipe):
    ids, mask = padded_batch([length], seed=seed)
    cache = CompressedCache(recipe)
    with torch.no_grad():
        logits = prefill(model, cache, ids, mask)
    return cache, logits.argmax(-1, keepdim=True)


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_stacked_decode_equals_separate_decode(ratio):
    model = install(tiny_model("qwen2"))
    recipe = fixed_recipe(ratio) if ratio else None
    lengths = (23, 14, 18)
    alone = []
    with torch.no_grad():
        for i, length in enumerate(lengths):
            cache, token = prefilled(model, length, i, recipe)
            alone.append(
                decode_steps(model, cache, token, torch.tensor([[length]]), torch.zeros(1, dtype=torch.long))
            )
        parts = [prefilled(model, length, i, recipe) for i, length in enumerate(lengths)]
        stacked = CompressedCache.stack([cache for cache, _ in parts])
        offsets = stacked.offsets.clone()
        assert offsets.tolist() == [0, 9, 5]
        tokens = torch.cat([token for _, token in parts])
        together = decode_steps(model, stacked, tokens, torch.tensor(lengths)[:, None], offsets)
    for row in range(3):
        torch.testing.assert_close(together[row], alone[row][0], atol=1e-5, rtol=0)

    rows = stacked.split()
    assert [row.get_seq_length() for row in rows] == [length + 3 for length in lengths]
    for row, length in zip(rows, lengths, strict=True):
        assert int(row.layers[0].view().slots.max()) == length + 2


def test_state_dict_round_trip_decodes_identically():
    model = install(tiny_model("llama"))
    cache, token = prefilled(model, 30, 4, Recipe.parse("h2o@0.6"))
    tensors, meta = cache.state_dict()
    restored = CompressedCache.from_state_dict({k: v.clone() for k, v in tensors.items()}, meta)
    assert restored.nbytes() == cache.nbytes() and str(restored.recipe) == str(cache.recipe)
    with torch.no_grad():
        original = decode_steps(model, cache, token, torch.tensor([[30]]), torch.zeros(1, dtype=torch.long))
        again = decode_steps(model, restored, token, torch.tensor([[30]]), torch.zeros(1, dtype=torch.long))
    torch.testing.assert_close(again, original, atol=0, rtol=0)


def test_inconsistent_state_dict_is_rejected():
    model = install(tiny_model("llama"))
    cache, _ = prefilled(model, 20, 5, Recipe.parse("knorm@0.5"))
    tensors, meta = cache.state_dict()
    tensors["0.dense.token.keys"] = tensors["0.dense.token.keys"][:-1]
    with pytest.raises(ValueError, match="blocks"):
        CompressedCache.from_state_dict(tensors, meta)


def test_selecting_shorter_rows_of_a_stacked_batch_keeps_storage_consistent():
    """Rows of equal length selected out of a batch whose other row was longer (serving: a long
    request leaves the batch) must hold exactly their own tokens, and decode on."""
    model = install(tiny_model("llama"))
    parts = [prefilled(model, length, i, None) for i, length in enumerate((23, 14))]
    stacked = CompressedCache.stack([cache for cache, _ in parts])
    stacked.batch_select_indices(torch.tensor([1]))
    layer = stacked.layers[0]
    assert layer.held_lengths().tolist() == [[14, 14]]
    assert layer.dense.pool.used == 2 and stacked.nbytes() == held_block_bytes(stacked)  # one block per head
    with torch.no_grad():
        steps = decode_steps(model, stacked, parts[1][1], torch.tensor([[14]]), stacked.offsets.clone())
    alone, token = prefilled(model, 14, 1, None)
    with torch.no_grad():
        reference = decode_steps(model, alone, token, torch.tensor([[14]]), torch.zeros(1, dtype=torch.long))
    torch.testing.assert_close(steps, reference, atol=1e-5, rtol=0)
