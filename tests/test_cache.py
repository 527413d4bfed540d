"""CompressedCache against DynamicCache and a per-head masked reference, on tiny random models."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from tiny_models import ARCHITECTURES, padded_batch, tiny_model
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvsqueeze.attention import install
from kvsqueeze.cache import CompressedCache
from kvsqueeze.engine import positions_from_mask, prefill
from kvsqueeze.recipe import Recipe
from kvsqueeze.scorers.base import Scorer
from kvsqueeze.sliding import SlidingLayers


@dataclass
class FixedScores(Scorer):
    """A scorer whose choice depends on slot and head only: heads keep different tokens."""

    name = "fixed"

    def score(self, inputs):
        heads = torch.arange(inputs.keys.shape[1])[None, :, None]
        return torch.sin(inputs.slots * 1.7 + heads * 2.3)


def fixed_recipe(ratio: float) -> Recipe:
    return Recipe(scorer=FixedScores(), ratio=ratio)


def run(model, cache, ids, mask, chunk_size=None, new_tokens=3):
    """Prefill then greedy-decode ``new_tokens``; returns logits of every decode step ``[B, n, V]``."""
    logits = prefill(model, cache, ids, mask, chunk_size)
    steps = [logits]
    positions = positions_from_mask(mask)[:, -1:]
    for _ in range(new_tokens):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = positions + 1
        token = steps[-1].argmax(-1, keepdim=True)
        out = model(input_ids=token, attention_mask=mask, position_ids=positions, past_key_values=cache)
        steps.append(out.logits[:, -1])
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_ratio_zero_matches_dynamic_cache_with_left_padding(arch):
    model = tiny_model(arch)
    ids, mask = padded_batch([20, 14])
    with torch.no_grad():
        reference = run(model, DynamicCache(config=model.config), ids, mask)
        install(model)
        one_shot = run(model, CompressedCache(), ids, mask)
        chunked = run(model, CompressedCache(Recipe.parse("full")), ids, mask, chunk_size=6)
    torch.testing.assert_close(one_shot, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked, one_shot, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_model_generate_with_compressed_cache(arch):
    model = tiny_model(arch)
    native = model.config._attn_implementation  # Gemma 2 has no SDPA
    ids, mask = padded_batch([16, 11], seed=1)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        reference = model.generate(**kwargs, past_key_values=DynamicCache(config=model.config))
        install(model)
        greedy = model.generate(**kwargs, past_key_values=CompressedCache())
        beams = model.generate(**kwargs, num_beams=2, past_key_values=CompressedCache())
        model.set_attn_implementation(native)
        beams_reference = model.generate(**kwargs, num_beams=2)
        install(model)
        everywhere = Recipe(scorer=FixedScores(), ratio=0.5, layers=SlidingLayers())  # sliding layers too
        compressed = model.generate(**kwargs, past_key_values=CompressedCache(everywhere))
    assert torch.equal(greedy, reference)
    assert torch.equal(beams, beams_reference)
    assert compressed.shape == reference.shape


def _reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Eager attention over a full DynamicCache, with evicted (layer, row, head, slot) entries masked."""
    keep = KEPT_SLOTS[module.layer_idx]  # [B, Hkv, T_context]
    n_rep = query.shape[1] // key.shape[1]
    allowed = attention_mask.expand(query.shape[0], key.shape[1], query.shape[2], key.shape[2]).clone()
    if query.shape[2] == 1:  # the prefill itself runs on full attention; eviction follows each layer
        allowed[..., : keep.shape[-1]] &= keep[:, :, None, :]
    allowed = allowed.repeat_interleave(n_rep, dim=1)
    key, value = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
    logits = (query @ key.transpose(-1, -2)) * scaling
    probs = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min).softmax(-1)
    return (probs @ value).transpose(1, 2).contiguous(), None


KEPT_SLOTS: dict[int, torch.Tensor] = {}


def _kept_slots(cache: CompressedCache, context_length: int) -> dict[int, torch.Tensor]:
    kept = {}
    for index, layer in enumerate(cache.layers):
        slots = layer.view().slots
        flags = torch.zeros(*slots.shape[:2], context_length + 1, dtype=torch.bool)
        in_context = (slots >= 0) & (slots < context_length)
        flags.scatter_(-1, torch.where(in_context, slots, context_length), True)
        kept[index] = flags[..., :context_length]
    return kept


def masked_reference_logits(model, cache: CompressedCache, ids, mask) -> torch.Tensor:
    """``run`` over a full ``DynamicCache`` with eager attention masking, per (layer, row, head),
    every context token that ``cache`` did not keep; kvsqueeze's attention is installed again after."""
    KEPT_SLOTS.clear()
    KEPT_SLOTS.update(_kept_slots(cache, ids.shape[1]))
    AttentionInterface.register("kvsq_reference", _reference_attention)
    AttentionMaskInterface.register(
        "kvsq_reference", lambda *a, **k: sdpa_mask(*a, **{**k, "allow_is_causal_skip": False})
    )
    model.set_attn_implementation("kvsq_reference")
    with torch.no_grad():
        reference = run(model, DynamicCache(config=model.config), ids, mask)
    install(model)
    return reference


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decode_after_eviction_matches_masked_reference(arch):
    """Positions continue from the true length, and each head attends to exactly what it kept."""
    model = tiny_model(arch)
    ids, mask = padded_batch([24, 17], seed=2)
    install(model)
    cache = CompressedCache(fixed_recipe(0.5))
    with torch.no_grad():
        compressed = run(model, cache, ids, mask)
    assert cache.get_seq_length() == ids.shape[1] + 3
    lengths = cache.layers[0].held_lengths()
    assert lengths[0].tolist() == [12 + 3] * 2 and lengths[1].tolist() == [9 + 3] * 2
    assert not torch.equal(*_kept_slots(cache, ids.shape[1])[0][0])  # heads kept different tokens

    reference = masked_reference_logits(model, cache, ids, mask)
    # decode steps (index >= 1) see the evicted cache; the prefill logits are unaffected by eviction
    torch.testing.assert_close(compressed, reference, atol=1e-5, rtol=0)

    # negative control: positions taken from the stored length instead of the true one
    wrong = CompressedCache(fixed_recipe(0.5))
    with torch.no_grad():
        prefill(model, wrong, ids, mask)
        token = compressed[:, 0].argmax(-1, keepdim=True)
        stored = wrong.layers[0].held_lengths()[:, 0].max().item()
        bad = model(
            input_ids=token,
            attention_mask=torch.cat([mask, mask.new_ones(2, 1)], 1),
            position_ids=torch.full((2, 1), stored),
            past_key_values=wrong,
        ).logits[:, -1]
    assert (bad - compressed[:, 1]).abs().max() > 1e-3


@dataclass
class KeyContentScores(Scorer):
    """Scores from key content only, so a row scores the same with or without left padding."""

    name = "key-content"

    def score(self, inputs):
        return inputs.keys[..., 0]


def test_batch_rows_are_independent_with_padding_and_compression():
    model = install(tiny_model("llama"))
    ids, mask = padded_batch([22, 13], seed=3)
    recipe = Recipe(scorer=KeyContentScores(), ratio=0.6)
    with torch.no_grad():
        batched = run(model, CompressedCache(recipe), ids, mask)
        for row in range(2):
            alone_ids = ids[row : row + 1, mask[row].bool()]
            alone = run(model, CompressedCache(recipe), alone_ids, torch.ones_like(alone_ids))
            torch.testing.assert_close(batched[row], alone[0], atol=1e-4, rtol=0)


def bookkeeping_bytes(cache: CompressedCache) -> int:
    """Bytes of the block tables, per-head counts and per-row counters."""
    total = sum(t.numel() * t.element_size() for t in (cache.context_tokens, cache.offsets))
    tables = (t for layer in cache.layers for tier in layer.tiers for t in tier.bookkeeping())
    return total + sum(t.numel() * t.element_size() for t in tables)


def held_block_bytes(cache: CompressedCache) -> int:
    """Bytes of the blocks the tables point at (each once), plus the bookkeeping."""
    total = bookkeeping_bytes(cache)
    for layer in cache.layers:
        for tier in layer.tiers:
            used = torch.arange(tier.table.shape[2]) < tier.blocks_held()[..., None]
            ids = tier.table[:, :, : used.shape[-1]][used].unique()
            total += sum(field[ids].numel() * field.element_size() for field in tier.pool.fields.values())
    return total


def test_nbytes_is_held_block_bytes_and_drops_with_ratio():
    model = install(tiny_model("llama"))
    ids, mask = padded_batch([40])
    held = {}
    for ratio in (0.0, 0.5, 0.75, 0.9):
        cache = CompressedCache(fixed_recipe(ratio), block_size=4)
        with torch.no_grad():
            prefill(model, cache, ids, mask)
        assert cache.nbytes() == held_block_bytes(cache)
        assert cache.get_seq_length() == 40
        kept = cache.layers[0].held_lengths()
        assert kept.unique().tolist() == [int(torch.tensor((1 - ratio) * 40).ceil())]
        held[ratio] = cache.nbytes()
        # layers * heads * tokens * head_dim * (k+v) * fp32
        assert cache.nbytes_full() == 2 * 2 * 40 * 16 * 2 * 4
    assert held[0.0] > held[0.5] > held[0.75] > held[0.9]
    # a full cache holds DynamicCache's bytes: 40 tokens fill 10 blocks of 4 exactly
    full = CompressedCache(block_size=4)
    with torch.no_grad():
        prefill(model, full, ids, mask)
    assert full.nbytes() - full.nbytes_full() == bookkeeping_bytes(full)


def test_chunked_prefill_compresses_after_each_chunk():
    model = install(tiny_model("llama"))
    ids, mask = padded_batch([60])
    cache = CompressedCache(fixed_recipe(0.75))
    peaks = []
    with torch.no_grad():
        for stop in range(10, 61, 10):
            prefill(model, cache, ids[:, stop - 10 : stop], mask[:, :stop])
            peaks.append(cache.layers[0].held_lengths().max().item())
    assert peaks == [int(torch.tensor(0.25 * n).ceil()) for n in range(10, 61, 10)]


def test_query_aware_protects_the_question():
    model = install(tiny_model("llama"))
    ids, mask = padded_batch([30])
    cache = CompressedCache(fixed_recipe(0.8))
    with torch.no_grad(), cache.settings(protect_from=24):
        prefill(model, cache, ids, mask)
    for layer in cache.layers:
        slots = layer.view().slots
        assert set(range(24, 30)) <= set(slots[0, 0].tolist())
        assert slots.shape[-1] == 6 + int(torch.tensor(0.2 * 24).ceil())


@pytest.mark.parametrize(
    "recipe", ["knorm@0.5", "kivi2:group_size=8,residual=4", "knorm+mixed:group_size=8@0.5"]
)
def test_nbytes_at_16_bits_is_what_a_16_bit_model_holds(recipe):
    ids, mask = padded_batch([50, 41])
    held = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = install(tiny_model("llama")).to(dtype)
        cache = CompressedCache(Recipe.parse(recipe))
        with torch.no_grad():
            prefill(model, cache, ids, mask)
        held[dtype] = cache
    wide, narrow = held[torch.float32], held[torch.bfloat16]
    assert wide.nbytes(torch.bfloat16) == narrow.nbytes()
    assert narrow.nbytes(torch.bfloat16) == narrow.nbytes()
    if wide.recipe.quantizer is None:  # the model's own KV halves; quantized codes do not change
        assert wide.nbytes(torch.bfloat16) < 0.6 * wide.nbytes()
    else:
        assert wide.nbytes(torch.bfloat16) == wide.nbytes()
