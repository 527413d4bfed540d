"""Mixed precision by importance (`mixed`): what a scorer would evict is kept in low bits."""

from __future__ import annotations

import pytest
import torch
from test_cache import run
from test_quantization import held_bytes
from tiny_models import padded_batch, tiny_model

from kvsqueeze.attention import install
from kvsqueeze.cache import CompressedCache
from kvsqueeze.engine import prefill
from kvsqueeze.quantized_store import QuantizedBody
from kvsqueeze.quantizers import KIVI4
from kvsqueeze.quantizers.packing import dequantize, quantize
from kvsqueeze.recipe import Recipe, RecipeError

TIERS = "group_size=8,residual=4"
LENGTHS = [70, 55]


def slots_by_head(slots: torch.Tensor, lengths: torch.Tensor) -> list[set[int]]:
    heads = torch.repeat_interleave(torch.arange(lengths.numel()), lengths.flatten())
    out: list[set[int]] = [set() for _ in range(lengths.numel())]
    for head, slot in zip(heads.tolist(), slots.tolist(), strict=True):
        out[head].add(slot)
    return out


def prefilled(recipe: str, model) -> CompressedCache:
    ids, mask = padded_batch(LENGTHS, seed=3)
    cache = CompressedCache(Recipe.parse(recipe))
    with torch.no_grad():
        prefill(model, cache, ids, mask)
    return cache


def test_mixed_stores_what_the_scorer_keeps_in_high_bits_and_the_rest_in_low_bits():
    model = install(tiny_model("llama"))
    mixed = prefilled(f"snapkv:window=4+mixed:{TIERS}@0.75", model)
    evicting = prefilled(f"snapkv:window=4+kivi4:{TIERS}@0.75", model)
    full = prefilled("full", model)
    padding = max(LENGTHS) - torch.tensor(LENGTHS)
    for layer, reference, dense in zip(mixed.layers, evicting.layers, full.layers, strict=True):
        layer.validate()
        view, kept = layer.view(), reference.view()
        low = layer.body.low
        low_slots = slots_by_head(low.field("slots"), low.lengths)
        for flat, (row, head) in enumerate((r, h) for r in range(2) for h in range(2)):
            kept_slots = set(kept.slots[row, head][kept.slots[row, head] >= 0].tolist())
            held = set(view.slots[row, head][view.slots[row, head] >= 0].tolist())
            real = set(range(int(padding[row]), max(LENGTHS)))
            assert held == real  # nothing evicted but the padding
            assert low_slots[flat] == real - kept_slots  # demoted = what snapkv@0.75 evicts
            assert held - low_slots[flat] == kept_slots
        # the low tier is 2-bit, the high one 4-bit: errors against the unquantized keys say so
        low_keys, _ = low.dequantized()
        truth = dense.view().keys
        flat_heads = torch.repeat_interleave(torch.arange(4), low.lengths.flatten())
        exact = truth.flatten(0, 1)[flat_heads, low.field("slots").long()]
        span = (truth.amax(2) - truth.amin(2)).flatten(0, 1)[flat_heads]
        low_error = (low_keys - exact).abs()
        assert bool((low_error <= span / 6 + 2e-2).all())  # half a 2-bit step of the head's range
        high_keys, _ = layer.body.high.dequantized()
        high_heads = torch.repeat_interleave(torch.arange(4), layer.body.high.lengths.flatten())
        high_exact = truth.flatten(0, 1)[high_heads, layer.body.high.field("slots").long()]
        assert (high_keys - high_exact).abs().mean() < low_error.mean() / 2
    assert mixed.tokens_kept() == full.tokens_kept() - 2 * 2 * int(padding.sum())
    assert evicting.nbytes() < mixed.nbytes() < prefilled(f"kivi4:{TIERS}", model).nbytes()
    assert mixed.nbytes() == held_bytes(mixed)


def test_short_groups_are_quantized_on_their_own_tokens():
    keys, values = torch.randn(13, 8), torch.randn(13, 8)
    body = QuantizedBody(KIVI4(group_size=4), 1, 2, torch.device("cpu"))
    body.append(keys, values, {}, torch.tensor([[5, 8]]))
    assert body.group_sizes.tolist() == [4, 1, 4, 4] and body.group_counts.tolist() == [[2, 2]]
    decoded, _ = body.dequantized()
    codes, scale, low = quantize(keys[:4][None], 4, dim=1)
    assert torch.allclose(decoded[:4], dequantize(codes, scale, low)[0])  # as if quantized alone
    assert torch.allclose(decoded[4], keys[4], atol=1e-2)  # a group of one: its own min, no range


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


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("snapkv+cake+mixed@0.5", "re-trims"),
        ("snapkv+mixed:high_bits=2,low_bits=4@0.5", "must not exceed"),
        ("snapkv+mixed:high_bits=3@0.5", "mixed:high_bits must be one of 2, 4, 8, got 3"),
    ],
)
def test_mixed_rejects_what_it_cannot_do(text, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.parse(text)
