"""Paged storage: appends copy nothing stored, windows are held as transformers holds them,
rows of any shape batch together."""

from __future__ import annotations

import pytest
import torch
from test_cache import run
from tiny_models import ARCHITECTURES, padded_batch, tiny_model
from transformers import DynamicCache

from kvsqueeze.attention import install
from kvsqueeze.baseline import transformers_cache_bytes
from kvsqueeze.cache import CompressedCache
from kvsqueeze.engine import prefill
from kvsqueeze.recipe import Recipe
from kvsqueeze.storage.pool import BlockPool


def test_a_decode_step_writes_only_into_tail_blocks():
    """Blocks that were full before a step keep their memory and their values."""
    model = install(tiny_model("llama"))
    ids, mask = padded_batch([37, 30])
    cache = CompressedCache(Recipe.parse("knorm@0.5"), block_size=4)
    with torch.no_grad():
        prefill(model, cache, ids, mask)
    dense = cache.layers[0].dense
    full_blocks = dense.table[:, :, : int(dense.count.min()) // dense.block_size].flatten()
    keys = dense.pool.fields["keys"]
    pointers = [keys[block].data_ptr() for block in full_blocks.tolist()]
    before = keys[full_blocks].clone()
    storage = keys.untyped_storage().data_ptr()
    with torch.no_grad():
        step_mask = torch.cat([mask, mask.new_ones(2, 1)], 1)
        model(input_ids=ids[:, :1], attention_mask=step_mask, past_key_values=cache)
    keys = dense.pool.fields["keys"]
    assert keys.untyped_storage().data_ptr() == storage  # the pool did not move
    assert [keys[block].data_ptr() for block in full_blocks.tolist()] == pointers
    assert torch.equal(keys[full_blocks], before)
    assert len(full_blocks) > 0


def test_a_pool_grows_by_what_is_asked_or_a_quarter_and_reuses_freed_blocks():
    pool = BlockPool(4, torch.device("cpu"))
    pool.add_field("keys", (4, 2), torch.float32)
    first = pool.allocate(3)
    assert pool.capacity == 4 and pool.used == 3 and first.tolist() == [0, 1, 2]
    pool.free(first[:2])
    again = pool.allocate(2)
    assert sorted(again.tolist()) == [0, 1] and pool.capacity == 4  # freed blocks come back first
    pool.allocate(3)
    assert pool.capacity == 6 and pool.used == 6  # what the request needs (more than a quarter)
    pool.allocate(1)
    assert pool.capacity == 7 and pool.used == 7
    pool.allocate(13)
    assert pool.capacity == 20 and bool((pool.fields["keys"][7:] == 0).all())


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_full_cache_bytes_are_what_dynamic_cache_holds(arch):
    """``nbytes_full`` is transformers' own default cache, sliding layers included, and the
    paged ``full`` cache holds no more tokens than it (within one block per head)."""
    model = tiny_model(arch)
    ids, mask = padded_batch([30, 22], seed=4)
    with torch.no_grad():
        dynamic = DynamicCache(config=model.config)
        run(model, dynamic, ids, mask)
        install(model)
        cache = CompressedCache(block_size=4)
        run(model, cache, ids, mask)
    held = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in dynamic.layers)
    assert cache.nbytes_full() == held == transformers_cache_bytes(model.config, ids.shape[1] + 3, batch=2)
    for layer, reference in zip(cache.layers, dynamic.layers, strict=True):
        stored = reference.keys.shape[2]
        assert layer.is_sliding == reference.is_sliding
        assert bool((layer.held_lengths() <= stored + layer.dense.block_size - 1).all())
        if layer.is_sliding:
            assert stored == layer.window - 1 < ids.shape[1]  # the window really is shorter


def test_short_quantized_and_long_rows_batch_together():
    """A row with no quantized block yet and a row with several stack, decode and split."""
    model = install(tiny_model("llama"))
    recipe = Recipe.parse("kivi2:group_size=8,residual=4")
    caches, tokens = [], []
    with torch.no_grad():
        for length, seed in ((9, 1), (50, 2)):
            ids, mask = padded_batch([length], seed=seed)
            cache = CompressedCache(recipe)
            tokens.append(prefill(model, cache, ids, mask).argmax(-1, keepdim=True))
            caches.append(cache)
    assert (
        int(caches[0].layers[0].quantized[0].count.sum())
        == 0
        < int(caches[1].layers[0].quantized[0].count.sum())
    )
    stacked = CompressedCache.stack(caches)
    assert stacked.offsets.tolist() == [41, 0]
    width = stacked.get_seq_length()
    mask = (torch.arange(width + 1)[None] >= stacked.offsets[:, None]).long()
    with torch.no_grad():
        out = model(
            input_ids=torch.cat(tokens),
            attention_mask=mask,
            position_ids=torch.tensor([[9], [50]]),
            past_key_values=stacked,
        )
    assert torch.isfinite(out.logits).all()
    short, long = stacked.split()
    assert [short.get_seq_length(), long.get_seq_length()] == [10, 51]
    assert short.layers[0].held_lengths().tolist() == [[10, 10]]
