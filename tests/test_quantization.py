"""Packed KIVI storage: exact packing, bounded error, real bytes, composition with eviction."""

from __future__ import annotations

import math

import pytest
import torch
from test_cache import bookkeeping_bytes, fixed_recipe, held_block_bytes, run
from tiny_models import padded_batch, tiny_model

from kvsqueeze.attention import install
from kvsqueeze.cache import CompressedCache
from kvsqueeze.engine import prefill
from kvsqueeze.quantizers import GEAR, KIVI2, KIVI4
from kvsqueeze.quantizers.packing import dequantize, pack_codes, quantize, unpack_codes
from kvsqueeze.recipe import Recipe


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip_is_exact(bits):
    codes = torch.randint(0, 1 << bits, (7, 3, 64), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 3, 64 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 4])
def test_quantization_error_within_half_a_step(bits):
    x = torch.randn(50, 32, 64) * torch.linspace(0.1, 10, 64)
    codes, scale, low = quantize(x, bits, dim=1)
    error = (dequantize(codes, scale, low) - x).abs()
    step = (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) / ((1 << bits) - 1)
    # half a step, plus the 16-bit rounding of the scale (times the largest code) and of the minimum
    bound = step / 2 + step * ((1 << bits) - 1) * 2**-10 + x.abs().amax(1, keepdim=True) * 2**-10
    assert bool((error <= bound).all())
    assert error.max() > step.min() / 8  # the bound is not vacuous: there is real quantization error


def test_kivi_groups_keys_per_channel_and_values_per_token():
    quantizer = KIVI2(group_size=4)
    keys = torch.randn(2, 4, 8)
    keys[..., 3] *= 100  # an outlier channel: per-channel grouping confines its range to channel 3
    per_token, per_block = quantizer.encode_blocks(keys, torch.randn(2, 4, 8))
    assert per_block["key_scale"].shape == (2, 8) and per_token["value_scale"].shape == (2, 4, 2)
    assert per_block["key_scale"][:, 3].min() > 10 * per_block["key_scale"][:, [0, 1, 2, 4]].max()
    decoded, _ = quantizer.decode_blocks(per_token, per_block)
    ranges = keys.amax(1) - keys.amin(1)
    assert bool(((decoded - keys).abs() <= ranges[:, None] / 6 + 1e-2).all())


def test_value_groups_can_differ_from_key_groups():
    keys, values = torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    per_token, per_block = KIVI2(group_size=4, value_group_size=16).encode_blocks(keys, values)
    assert per_block["key_scale"].shape == (2, 16)  # keys: one scale per channel per block of 4 tokens
    assert per_token["value_scale"].shape == (2, 4, 1)  # values: one scale per token over 16 channels
    assert KIVI2(group_size=4).encode_blocks(keys, values)[0]["value_scale"].shape == (2, 4, 4)


def kivi_theoretical_bytes(layers, heads, quantized, recent, dim, bits, group, with_slots):
    """Blocks of ``group`` tokens in the KIVI layout: codes + 16-bit per-token value scales and
    minimums + 16-bit per-channel key scales and minimums per block, the 16-bit recent window in
    blocks of ``group``, int32 slots per token and an int64 fill count per quantized block."""
    blocks, recent_blocks = math.ceil(quantized / group), math.ceil(recent / group)
    per_token = 2 * dim * bits / 8 + 2 * 2 * (dim // group if dim % group == 0 else 1) + 4 * with_slots
    quantized_block = group * per_token + 2 * 2 * dim + 8
    recent_block = group * (2 * dim * 2 + 4 * with_slots)
    return layers * heads * (blocks * quantized_block + recent_blocks * recent_block)


@pytest.mark.parametrize(("recipe", "kept", "quantized"), [("kivi2", 70, 64), ("snapkv+kivi4@0.5", 35, 24)])
def test_real_bytes_match_codes_scales_window_and_indices(recipe, kept, quantized):
    model = install(tiny_model("llama"))
    ids, mask = padded_batch([70])
    parsed = Recipe.parse(recipe.replace("snapkv", "snapkv:window=4"))
    parsed.quantizer.group_size, parsed.quantizer.residual = 8, 4
    cache = CompressedCache(parsed)
    with torch.no_grad():
        prefill(model, cache, ids, mask)
    layer = cache.layers[0]
    assert layer.quantized[0].count.unique().tolist() == [quantized]
    assert layer.dense.count.unique().tolist() == [kept - quantized]
    assert cache.nbytes() == held_block_bytes(cache)
    theory = kivi_theoretical_bytes(
        2, 2, quantized, kept - quantized, 16, parsed.quantizer.bits, 8, with_slots="snapkv" in recipe
    )
    content = cache.nbytes() - bookkeeping_bytes(cache)  # tables: 8 bytes per block, 7% here, 0.1% at D=64
    assert abs(content / theory - 1) < 0.05
    assert content < cache.nbytes_full(torch.float16) / 2  # head_dim 16: scales weigh a lot


def quantized_codes_by_head_and_slot(tier) -> dict[tuple[int, int, int], torch.Tensor]:
    """``(row, head, slot) -> key codes`` of every token a quantized tier holds."""
    held, slots, codes = tier.held(), tier.gather("slots"), tier.gather("key_codes")
    return {
        (row, head, int(slots[row, head, i])): codes[row, head, i] for row, head, i in held.nonzero().tolist()
    }


def test_quantized_tokens_survive_later_eviction_without_requantization():
    model = install(tiny_model("llama"))
    ids, mask = padded_batch([64])
    recipe = Recipe(scorer=fixed_recipe(0.5).scorer, ratio=0.5, quantizer=KIVI2(group_size=4, residual=4))
    cache = CompressedCache(recipe)
    with torch.no_grad():
        prefill(model, cache, ids[:, :32], mask[:, :32])
        before = quantized_codes_by_head_and_slot(cache.layers[0].quantized[0])
        prefill(model, cache, ids[:, 32:], mask)
    after = quantized_codes_by_head_and_slot(cache.layers[0].quantized[0])
    survivors = before.keys() & after.keys()
    assert 0 < len(survivors) < len(before)  # some old quantized tokens evicted, others kept
    assert all(torch.equal(after[key], before[key]) for key in survivors)
    cache.layers[0].validate()


def test_attention_sees_dequantized_body_and_decode_stays_close_to_full():
    model = tiny_model("qwen2")
    ids, mask = padded_batch([40, 29], seed=6)
    install(model)
    with torch.no_grad():
        full = run(model, CompressedCache(), ids, mask)
        kivi4 = run(model, CompressedCache(Recipe(quantizer=KIVI4(group_size=8, residual=4))), ids, mask)
        kivi2 = run(model, CompressedCache(Recipe(quantizer=KIVI2(group_size=8, residual=4))), ids, mask)
    error4, error2 = (kivi4 - full).abs().max(), (kivi2 - full).abs().max()
    assert 0 < error4 < error2 < 0.5  # fewer bits, more error; both small on a tiny model


def test_quantized_cache_state_dict_and_stack_round_trip():
    model = install(tiny_model("llama"))
    recipe = Recipe.parse("knorm+kivi2:group_size=8,residual=4@0.5")
    caches = []
    with torch.no_grad():
        for length, seed in ((80, 1), (60, 2)):
            ids, mask = padded_batch([length], seed=seed)
            cache = CompressedCache(recipe)
            prefill(model, cache, ids, mask)
            caches.append(cache)
    assert all(int(cache.layers[0].quantized[0].count.min()) > 0 for cache in caches)
    tensors, meta = caches[0].state_dict()
    restored = CompressedCache.from_state_dict(tensors, meta)
    assert restored.nbytes() == caches[0].nbytes()
    assert torch.equal(restored.layers[1].view().keys, caches[0].layers[1].view().keys)
    stacked = CompressedCache.stack(caches)
    first, second = stacked.split()
    for original, back in ((caches[0], first), (caches[1], second)):
        assert torch.equal(back.layers[0].view().keys, original.layers[0].view().keys)
        assert torch.equal(back.layers[0].view().slots, original.layers[0].view().slots)


def relative_error(quantizer, keys, values):
    """Relative error of ``[N, D]`` keys and values encoded in blocks of ``group_size`` tokens."""
    blocks = (-1, quantizer.group_size, keys.shape[-1])
    per_token, per_block = quantizer.encode_blocks(keys.reshape(blocks), values.reshape(blocks))
    decoded_keys, decoded_values = (
        t.reshape(keys.shape) for t in quantizer.decode_blocks(per_token, per_block)
    )
    return ((decoded_keys - keys).norm() / keys.norm()).item(), (
        (decoded_values - values).norm() / values.norm()
    ).item()


def test_gear_corrections_each_reduce_the_error_of_plain_quantization():
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(64, 64, generator=generator), torch.randn(64, 64, generator=generator)
    keys[:, 5] *= 20  # an outlier channel
    values[3, 7] = 40.0  # an outlier entry
    plain = relative_error(KIVI4(), keys, values)
    gear = relative_error(GEAR(), keys, values)
    without_low_rank = relative_error(GEAR(rank=0), keys, values)
    without_outliers = relative_error(GEAR(outliers=0.0), keys, values)
    for part in range(2):
        assert gear[part] < without_low_rank[part] < plain[part]
        assert gear[part] < without_outliers[part] < plain[part]


def test_gear_restores_outliers_and_stores_a_row_per_token():
    keys, values = torch.randn(4, 8, 16), torch.randn(4, 8, 16)
    keys[0, 4, 9] = 50.0
    quantizer = GEAR(group_size=8, rank=2, outliers=0.1)
    per_token, per_block = quantizer.encode_blocks(keys, values)
    decoded, _ = quantizer.decode_blocks(per_token, per_block)
    assert abs(decoded[0, 4, 9].item() - 50.0) < 0.05  # 16-bit value, exact position
    assert per_token["key_low_rank"].shape == (4, 8, 2) and per_block["key_basis"].shape == (4, 2 * 16)
    assert per_token["key_outlier_index"].shape == (4, 8, 2)


def test_gear_in_the_cache_composes_with_eviction():
    model = install(tiny_model("llama"))
    ids, mask = padded_batch([60, 45], seed=7)
    recipe = Recipe.parse("knorm+gear:group_size=8,residual=4@0.5")
    with torch.no_grad():
        full = run(model, CompressedCache(Recipe.parse("knorm@0.5")), ids, mask)
        cache = CompressedCache(recipe)
        gear = run(model, cache, ids, mask)
    assert int(cache.layers[0].quantized[0].count.min()) > 0
    assert cache.nbytes() == held_block_bytes(cache)
    assert (gear - full).abs().max() < 0.1  # 4-bit + corrections: close to the unquantized eviction
