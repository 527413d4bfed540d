"""Mixed precision by importance (`mixed`): what a scorer would evict is kept in low bits."""

from __future__ import annotations

import pytest
import torch
from test_cache import held_block_bytes, run
from tiny_models import padded_batch, tiny_model

from kvsqueeze.attention import install
from kvsqueeze.cache import CompressedCache
from kvsqueeze.engine import prefill
from kvsqueeze.quantizers import KIVI4
from kvsqueeze.quantizers.packing import dequantize, quantize
from kvsqueeze.recipe import Recipe, RecipeError
from kvsqueeze.storage.tiers import QuantizedTier

TIERS = "group_size=8,residual=4"
LENGTHS = [70, 55]


def tier_slots(tier: QuantizedTier) -> list[set[int]]:
    """The slots a quantized tier holds, per (row, head) in row-major order."""
    held, slots = tier.held(), tier.gather("slots")
    return [set(slots[row, head][held[row, head]].tolist()) for row in range(2) for head in range(2)]


def tier_keys(tier: QuantizedTier) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decoded keys ``[N, D]`` of every token a quantized tier holds, its flat head and slot."""
    held = tier.held()
    flat_heads = torch.arange(4).view(2, 2, 1).expand_as(held)[held]
    return tier.decode()[0][held], flat_heads, tier.gather("slots")[held].long()


def prefilled(recipe: str, model, chunk_size: int | None = None) -> CompressedCache:
    ids, mask = padded_batch(LENGTHS, seed=3)
    cache = CompressedCache(Recipe.parse(recipe))
    with torch.no_grad():
        prefill(model, cache, ids, mask, chunk_size)
    return cache


def test_mixed_stores_what_the_scorer_keeps_in_high_bits_and_the_rest_in_low_bits():
    model = install(tiny_model("llama", head_dim=64))  # the real model's head size: codes outweigh scales
    mixed = prefilled(f"snapkv:window=4+mixed:{TIERS}@0.75", model)
    evicting = prefilled(f"snapkv:window=4+kivi4:{TIERS}@0.75", model)
    full = prefilled("full", model)
    padding = max(LENGTHS) - torch.tensor(LENGTHS)
    for layer, reference, dense in zip(mixed.layers, evicting.layers, full.layers, strict=True):
        layer.validate()
        view, kept = layer.view(), reference.view()
        low, high = layer.quantized
        low_slots = tier_slots(low)
        for flat, (row, head) in enumerate((r, h) for r in range(2) for h in range(2)):
            kept_slots = set(kept.slots[row, head][kept.slots[row, head] >= 0].tolist())
            held = set(view.slots[row, head][view.slots[row, head] >= 0].tolist())
            real = set(range(int(padding[row]), max(LENGTHS)))
            assert held == real  # nothing evicted but the padding
            assert low_slots[flat] == real - kept_slots  # demoted = what snapkv@0.75 evicts
            assert held - low_slots[flat] == kept_slots
        # the low tier is 2-bit, the high one 4-bit: errors against the unquantized keys say so
        truth = dense.view().keys.flatten(0, 1)  # [row * head, slot, D]: nothing evicted
        low_keys, flat_heads, slots = tier_keys(low)
        span = (truth.amax(1) - truth.amin(1))[flat_heads]
        low_error = (low_keys - truth[flat_heads, slots]).abs()
        assert bool((low_error <= span / 6 + 2e-2).all())  # half a 2-bit step of the head's range
        high_keys, high_heads, high_slots = tier_keys(high)
        assert (high_keys - truth[high_heads, high_slots]).abs().mean() < low_error.mean() / 2
    assert mixed.tokens_kept() == full.tokens_kept() - 2 * 2 * int(padding.sum())
    assert evicting.nbytes() < mixed.nbytes() < prefilled(f"kivi4:{TIERS}", model).nbytes()
    assert mixed.nbytes() == held_block_bytes(mixed)


@pytest.mark.parametrize(
    "recipe", [f"streaming:sinks=4+mixed:{TIERS}@0.75", f"snapkv:window=4+mixed:{TIERS}@0.75"]
)
def test_mixed_under_chunked_prefill_keeps_slot_order_and_the_real_sinks(recipe):
    """Demoted tokens live in another tier than the kept ones: the view scorers read is still in
    slot order at every chunk, so StreamingLLM's sinks are the first real tokens of each row."""
    model = install(tiny_model("llama"))
    chunked = prefilled(recipe, model, chunk_size=16)
    padding = max(LENGTHS) - torch.tensor(LENGTHS)
    for layer in chunked.layers:
        view = layer.view()
        held = view.slots >= 0
        for row in range(2):
            for head in range(2):
                slots = view.slots[row, head][held[row, head]]
                assert bool((slots[1:] > slots[:-1]).all())  # in slot order
        if recipe.startswith("streaming"):
            _, high = layer.quantized
            for flat, kept in enumerate(tier_slots(high)):
                first = int(padding[flat // 2])
                assert set(range(first, first + 4)) <= kept  # the real sinks stayed in high bits


def test_short_blocks_are_quantized_on_their_own_tokens():
    keys, values = torch.randn(13, 8), torch.randn(13, 8)
    tier = QuantizedTier(KIVI4(group_size=4), 1, 2, 8, torch.device("cpu"))
    tier.add({"keys": keys, "values": values}, torch.tensor([[5, 8]]))
    ids, _ = tier.block_ids()
    assert tier.pool.fields["fill"][ids].tolist() == [[[4, 1], [4, 4]]] and tier.blocks.tolist() == [[2, 2]]
    decoded = tier.decode()[0][0, 0]
    codes, scale, low = quantize(keys[:4][None], 4, dim=1)
    assert torch.allclose(decoded[:4], dequantize(codes, scale, low)[0])  # as if quantized alone
    assert torch.allclose(decoded[4], keys[4], atol=1e-2)  # a block of one: its own min, no range


def test_mixed_decodes_close_to_the_unquantized_cache_and_round_trips():
    model = install(tiny_model("qwen2"))
    ids, mask = padded_batch([60, 45], seed=5)
    with torch.no_grad():
        full = run(model, CompressedCache(), ids, mask)
        cache = CompressedCache(Recipe.parse(f"knorm+mixed:{TIERS}@0.5"))
        mixed = run(model, cache, ids, mask)
        kivi2 = run(model, CompressedCache(Recipe.parse(f"kivi2:{TIERS}")), ids, mask)
    assert 0 < (mixed - full).abs().max() < (kivi2 - full).abs().max()
    tensors, meta = cache.state_dict()
    restored = CompressedCache.from_state_dict(tensors, meta)
    assert restored.nbytes() == cache.nbytes()
    assert torch.equal(restored.layers[1].view().keys, cache.layers[1].view().keys)
    rows = cache.split()
    for back, row in zip(CompressedCache.stack(rows).split(), rows, strict=True):
        assert torch.equal(back.layers[1].view().keys, row.layers[1].view().keys)
        assert torch.equal(back.layers[1].view().slots, row.layers[1].view().slots)


def test_mixed_composes_with_budgets_that_compare_layers():
    """CAKE and the global threshold set counts once every layer is ranked: what they do not keep
    is demoted, nothing is evicted but padding."""
    model = install(tiny_model("llama", layers=3))
    for budget in ("cake:window=4", "global"):
        cache = prefilled(f"snapkv:window=4+{budget}+mixed:{TIERS}@0.75", model)
        for layer in cache.layers:
            assert layer.held_lengths().tolist() == [[n, n] for n in LENGTHS]  # every real token
            assert int(layer.quantized[0].count.sum()) > 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("snapkv+mixed:high_bits=2,low_bits=4@0.5", "must not exceed"),
        ("snapkv+mixed:high_bits=3@0.5", "mixed:high_bits must be one of 2, 4, 8, got 3"),
    ],
)
def test_mixed_rejects_what_it_cannot_do(text, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.parse(text)
