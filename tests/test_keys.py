"""Key reducers: ThinK's channel pruning and low-rank keys store fewer numbers, really."""

from __future__ import annotations

import pytest
import torch
from test_cache import held_block_bytes, run
from test_cache_batching import decode_steps, prefilled
from tiny_models import padded_batch, tiny_model

from kvsqueeze.attention import install
from kvsqueeze.cache import CompressedCache
from kvsqueeze.keys import LowRankKeys, ThinK
from kvsqueeze.recipe import Recipe, RecipeError


def test_think_keeps_the_channels_with_the_largest_query_weighted_norm():
    keys = torch.ones(1, 4, 4) * torch.tensor([1.0, 2.0, 3.0, 4.0])  # key norms grow with the channel
    norms = {"query_norms": torch.tensor([[4.0, 3.0, 0.1, 0.1]])}  # the queries use channels 0 and 1
    reduced, side = ThinK(channels=0.5).reduce(keys, norms)
    assert side["key_channels"].tolist() == [[0, 1]]  # by the keys alone it would be 2 and 3
    assert torch.equal(reduced, keys[..., :2])
    restored = ThinK().restore(reduced, side, key_dim=4)
    assert torch.equal(restored, keys * torch.tensor([1.0, 1.0, 0.0, 0.0]))


def test_think_weighs_a_kv_head_by_every_query_head_that_reads_it():
    queries = torch.zeros(1, 4, 2, 3)  # 4 query heads over 2 KV heads, 2 queries each
    queries[0, 1, 0] = torch.tensor([3.0, 0.0, 0.0])
    queries[0, 0, 1] = torch.tensor([4.0, 1.0, 0.0])
    queries[0, 2, 0] = torch.tensor([0.0, 0.0, 2.0])
    norms = ThinK().observe(queries, kv_heads=2)["query_norms"]
    assert torch.allclose(norms, torch.tensor([[[5.0, 1.0, 0.0], [0.0, 0.0, 2.0]]]))


def test_lowrank_is_exact_on_low_rank_keys_and_loses_the_dropped_singular_values():
    torch.manual_seed(0)
    keys = torch.randn(3, 32, 2) @ torch.randn(3, 2, 16)  # rank 2 per block
    reduced, side = LowRankKeys(rank=2).reduce(keys, {})
    assert reduced.shape == (3, 32, 2) and side["key_basis"].shape == (3, 2, 16)
    torch.testing.assert_close(LowRankKeys().restore(reduced, side, 16), keys, atol=2e-2, rtol=1e-2)
    reduced, side = LowRankKeys(rank=1).reduce(keys, {})
    error = torch.linalg.norm(LowRankKeys().restore(reduced, side, 16) - keys, dim=(1, 2))
    second = torch.linalg.svdvals(keys)[:, 1]  # Eckart-Young: what rank 1 cannot hold
    torch.testing.assert_close(error, second, rtol=1e-2, atol=1e-2)


def think_cache(text: str, length: int = 200, chunk_size: int | None = None):
    """A cache of ``text`` and a ``full`` one after the same prefill and decode step."""
    model = install(tiny_model("llama"))
    ids, mask = padded_batch([length])
    cache = CompressedCache(Recipe.parse(text))
    with torch.no_grad():
        run(model, cache, ids, mask, chunk_size, new_tokens=1)
    full = CompressedCache(Recipe.parse("full"))
    with torch.no_grad():
        run(model, full, ids, mask, chunk_size, new_tokens=1)
    return cache, full


def test_think_stores_only_the_chosen_channels_of_the_context_keys():
    cache, full = think_cache("think:channels=0.25")
    for layer, reference in zip(cache.layers, full.layers, strict=True):
        tier = layer.quantized[0]
        dim = reference.dense.pool.fields["keys"].shape[-1]
        assert tier.pool.fields["keys16"].shape[-1] == dim // 4  # a quarter of the channels is stored
        keys, _ = tier.decode()
        # as the 16-bit window held them before they were encoded
        original = reference.view().keys[:, :, : keys.shape[2]].half().float()
        ids, _ = tier.block_ids()
        channels = tier.pool.fields["key_channels"][ids].long()  # [B, H, blocks, C]
        blocks = original.reshape(*channels.shape[:3], tier.block_size, dim)
        weights = tier.head_state["query_norms"][:, :, None] * blocks.square().sum(3).sqrt()
        chosen = weights.topk(dim // 4, dim=-1).indices.sort(-1).values
        assert torch.equal(channels, chosen)  # ThinK's criterion, block by block
        index = chosen[:, :, :, None].expand(*chosen.shape[:3], tier.block_size, dim // 4)
        kept = torch.zeros_like(blocks).scatter(-1, index, 1.0)
        torch.testing.assert_close(keys, (blocks * kept).reshape(keys.shape), atol=1e-2, rtol=1e-3)


def test_pruned_channels_are_bytes_not_held():
    half, _ = think_cache("think:channels=0.5")
    whole, _ = think_cache("think:channels=1.0")
    assert half.nbytes() == held_block_bytes(half)
    blocks = sum(layer.quantized[0].pool.used for layer in half.layers)
    tier = half.layers[0].quantized[0]
    dim = whole.layers[0].quantized[0].pool.fields["keys16"].shape[-1]
    dropped = dim - tier.pool.fields["keys16"].shape[-1]
    # per block: the 16-bit keys of the dropped channels and their one-byte indices
    assert whole.nbytes() - half.nbytes() == blocks * dropped * (tier.block_size * 2 + 1)


@pytest.mark.parametrize(
    "text",
    ["snapkv+think+kivi4@0.5", "snapkv+lowrank:rank=4+kivi4@0.5", "think+mixed", "snapkv+d2o+think@0.5"],
)
def test_key_reducers_compose_with_eviction_and_quantization(text):
    cache, _ = think_cache(text, length=600, chunk_size=128)
    without = text.replace("+think", "").replace("+lowrank:rank=4", "").replace("think+", "")
    alone, _ = think_cache(without, length=600, chunk_size=128)
    assert str(cache.recipe) == text
    assert cache.nbytes() == held_block_bytes(cache) < alone.nbytes()
    for layer in cache.layers:
        layer.validate()


def test_think_caches_stack_and_restore_with_their_query_norms():
    model = install(tiny_model("llama"))
    recipe = Recipe.parse("snapkv+think@0.5")
    parts = [prefilled(model, length, seed, recipe) for seed, length in enumerate((120, 90))]
    stacked = CompressedCache.stack([cache for cache, _ in parts])
    norms = [cache.layers[0].quantized[0].head_state["query_norms"] for cache, _ in parts]
    assert torch.equal(stacked.layers[0].quantized[0].head_state["query_norms"], torch.cat(norms))
    tensors, meta = parts[0][0].state_dict()
    restored = CompressedCache.from_state_dict({k: v.clone() for k, v in tensors.items()}, meta)
    token, start = parts[0][1], torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        original = decode_steps(model, parts[0][0], token, torch.tensor([[120]]), start, steps=40)
        again = decode_steps(model, restored, token, torch.tensor([[120]]), start, steps=40)
    torch.testing.assert_close(again, original, atol=0, rtol=0)  # 40 steps encode new blocks too


@pytest.mark.parametrize("text", ["think:channels=0", "think:window=0", "lowrank:rank=0", "think@0.5"])
def test_bad_key_reducer_options_are_recipe_errors(text):
    with pytest.raises(RecipeError):
        Recipe.parse(text)
