"""MiniCache (`minicache`): adjacent deep layers share one direction per token, real bytes saved."""

from __future__ import annotations

import math

import pytest
import torch
from test_cache import run
from tiny_models import ARCHITECTURES, padded_batch, tiny_model

from kvsqueeze.attention import install
from kvsqueeze.cache import CompressedCache
from kvsqueeze.compression import merge_across_layers
from kvsqueeze.depth import MiniCache
from kvsqueeze.recipe import Recipe

LAYERS = 4  # pairs (2, 3): layer 3 shares its tokens with layer 2


def one_head(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows)[None, None]


def test_minicache_interpolates_directions_keeps_magnitudes_and_retains_the_most_distinct_pair():
    # token 0: keys 90 degrees apart, equal values (distance 0.5); token 1: parallel keys, values
    # 45 degrees apart (0.25); token 2: opposite keys (1.0). gamma 0.5: retained above
    # 0.25 + 0.75 / 2 = 0.625, so token 2 only
    host = (one_head([2.0, 0.0], [1.0, 0.0], [0.0, 3.0]), one_head([1.0, 1.0], [1.0, 0.0], [1.0, 0.0]))
    guest = (one_head([0.0, 1.0], [3.0, 0.0], [0.0, -1.0]), one_head([2.0, 2.0], [1.0, 1.0], [0.0, 1.0]))
    candidates = torch.ones(1, 1, 3, dtype=torch.bool)
    keys, values, key_norms, value_norms, merged = MiniCache(t=0.5, gamma=0.5).merge(host, guest, candidates)
    assert merged.tolist() == [[[True, True, False]]]
    half = math.sqrt(0.5)
    torch.testing.assert_close(keys[0, 0, 0], 2 * torch.tensor([half, half]))  # |host| x midway direction
    torch.testing.assert_close(keys[0, 0, 1], torch.tensor([1.0, 0.0]))
    eighth = math.pi / 8  # halfway between 0 and 45 degrees
    torch.testing.assert_close(values[0, 0, 1], torch.tensor([math.cos(eighth), math.sin(eighth)]))
    torch.testing.assert_close(values[0, 0, 0], torch.tensor([1.0, 1.0]))
    assert torch.equal(keys[0, 0, 2], host[0][0, 0, 2]) and torch.equal(values[0, 0, 2], host[1][0, 0, 2])
    torch.testing.assert_close(key_norms[0, 0, :2], torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(value_norms[0, 0, :2], torch.tensor([math.sqrt(8.0), math.sqrt(2.0)]))


def test_t_weighs_the_deeper_layers_direction():
    host, guest = (one_head([1.0, 0.0]),) * 2, (one_head([0.0, 1.0]),) * 2
    candidates = torch.ones(1, 1, 1, dtype=torch.bool)
    for t, angle in ((0.0, 0.0), (1.0, math.pi / 2), (0.6, 0.6 * math.pi / 2)):
        keys = MiniCache(t=t, gamma=0.0).merge(host, guest, candidates)[0]
        torch.testing.assert_close(keys[0, 0, 0], torch.tensor([math.cos(angle), math.sin(angle)]))


def test_layers_pair_from_the_middle_down_and_only_full_attention_ones():
    assert MiniCache().pairs([None] * 8) == {5: 4, 7: 6}
    assert MiniCache().pairs([None] * 7) == {5: 4}
    assert MiniCache(start=0.0).pairs([None, None, 4, None]) == {1: 0}
    assert MiniCache(start=1.0).pairs([None] * 8) == {}


def fed_cache(recipe: str, host_keys: torch.Tensor, guest_scale: float) -> CompressedCache:
    """A cache of ``LAYERS`` layers fed the same random states, layer 3 (the guest) ``guest_scale``
    times layer 2's (same directions), then compressed as at the end of a prefill forward."""
    cache = CompressedCache(Recipe.parse(recipe))
    values = host_keys.flip(-1) + 1
    for index in range(LAYERS):
        scale = guest_scale if index == 3 else 1.0
        cache.update(host_keys * scale, values * scale, index)
    if cache.recipe.depth is not None:
        merge_across_layers(cache, cache.recipe.depth, set(range(LAYERS)))
    return cache


def test_a_deeper_layer_attends_its_hosts_tokens_at_its_own_magnitudes_and_stores_none():
    torch.manual_seed(0)
    keys = torch.randn(2, 2, 20, 8)
    full = fed_cache("full", keys, 3.0)
    merged = fed_cache("minicache:gamma=1", keys, 3.0)
    guest = merged.layers[3].held_tokens(torch.float32)
    assert merged.layers[3].held_lengths().sum() == 0  # it stores nothing of its own
    order = guest.slots.argsort(-1)
    assert torch.equal(guest.slots.gather(2, order), torch.arange(20).expand(2, 2, 20))
    reference = full.layers[3].held_tokens(torch.float32)
    index = order[..., None].expand(-1, -1, -1, 8)
    # exact up to the magnitudes, stored in 16 bits
    torch.testing.assert_close(guest.keys.gather(2, index), reference.keys, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(guest.values.gather(2, index), reference.values, rtol=1e-3, atol=1e-5)
    # the host's own states: same directions, its own magnitudes
    torch.testing.assert_close(merged.layers[2].held_tokens(torch.float32).keys, keys, atol=1e-6, rtol=0)
    saved = full.layers[3].nbytes() - merged.layers[3].nbytes()
    overhead = merged.layers[2].nbytes() - full.layers[2].nbytes()
    host = merged.layers[2].dense
    assert overhead == host.pool.used * host.block_size * 2 * 2  # two 16-bit magnitudes per token
    assert merged.nbytes() < full.nbytes() and saved > 4 * overhead


def test_tokens_too_far_apart_stay_in_the_deeper_layer_unchanged():
    torch.manual_seed(1)
    keys = torch.randn(1, 2, 20, 8)
    opposite = torch.zeros(1, 2, 20, 1)
    opposite[:, 0, :5], opposite[:, 1, 10:13] = 1, 1  # these tokens' keys point the other way: distance 1
    cache = CompressedCache(Recipe.parse("minicache"))
    for index in range(LAYERS):
        cache.update(keys * (1 - 2 * opposite) if index == 3 else keys, keys + 1, index)
    guest = cache.layers[3]
    before = guest.view()
    merge_across_layers(cache, cache.recipe.depth, set(range(LAYERS)))
    assert guest.held_lengths().tolist() == [[5, 3]]  # above 0 + (1 - 0) x 0.05
    after = guest.view()
    for head in range(2):
        stored = after.in_dense[0, head] & (after.slots[0, head] >= 0)
        slots = after.slots[0, head][stored]
        torch.testing.assert_close(after.keys[0, head][stored], before.keys[0, head][slots])
        assert sorted(after.slots[0, head][after.slots[0, head] >= 0].tolist()) == list(range(20))


@pytest.fixture(scope="module")
def model():
    tiny = tiny_model("llama", layers=LAYERS)
    install(tiny)
    return tiny


def test_merging_keeps_every_token_the_deeper_layer_attended_after_eviction(model):
    ids, mask = padded_batch([160, 130])  # long enough that merged tokens free whole blocks
    with torch.no_grad():
        plain = CompressedCache(Recipe.parse("snapkv@0.5"), config=model.config)
        merged = CompressedCache(Recipe.parse("snapkv+minicache:gamma=1@0.5"), config=model.config)
        run(model, plain, ids, mask, new_tokens=0)
        run(model, merged, ids, mask, new_tokens=0)
    before, after = plain.layers[3].view(), merged.layers[3].view()
    assert torch.equal(before.slots.sort(-1).values, after.slots.sort(-1).values)
    assert merged.layers[3].held_lengths().sum() < plain.layers[3].held_lengths().sum()
    assert merged.nbytes() < plain.nbytes()


def test_what_the_host_drops_the_deeper_layer_loses_and_a_crop_rolls_both_back(model):
    ids, mask = padded_batch([24])
    with torch.no_grad():
        cache = CompressedCache(Recipe.parse("minicache:gamma=1"), config=model.config)
        run(model, cache, ids, mask, new_tokens=2)
    cache.crop(-6)
    guest = cache.layers[3].view()
    assert int(guest.slots.max()) == cache.get_seq_length() - 1 == 19
    assert sorted(guest.slots[0, 0].tolist()) == list(range(20))


def test_a_saved_or_stacked_cache_shares_the_same_tokens(model):
    ids, mask = padded_batch([24, 17])
    with torch.no_grad():
        caches = []
        for row in range(2):
            cache = CompressedCache(Recipe.parse("minicache:gamma=0.5"), config=model.config)
            real = mask[row : row + 1].bool()[0]
            run(model, cache, ids[row : row + 1, real], mask[row : row + 1, real], new_tokens=1)
            caches.append(cache)
    restored = CompressedCache.from_state_dict(*caches[0].state_dict())
    restored.configure(model.config)
    stacked = CompressedCache.stack(caches)
    for other, row in ((restored, 0), (stacked.split()[1], 1)):
        expected = caches[row].layers[3].held_tokens(torch.float32)
        got = other.layers[3].held_tokens(torch.float32)
        torch.testing.assert_close(got.keys, expected.keys)
        assert torch.equal(got.slots, expected.slots)


@pytest.mark.filterwarnings("ignore:recipe .* compresses no layer")  # Mistral, Phi-3: every layer slides
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize(
    ("recipe", "without"),
    [
        ("minicache:gamma=1", "full"),
        (
            "snapkv+minicache:gamma=1+kivi4:group_size=8,residual=4@0.5",
            "snapkv+kivi4:group_size=8,residual=4@0.5",
        ),
    ],
)
def test_minicache_decodes_on_every_architecture_and_holds_less(arch, recipe, without):
    tiny = tiny_model(arch, layers=None if arch == "gemma3" else 6)
    ids, mask = padded_batch([26, 19])
    with torch.no_grad():
        install(tiny)
        cache = CompressedCache(Recipe.parse(recipe), config=tiny.config)
        baseline = CompressedCache(Recipe.parse(without), config=tiny.config)
        logits = run(tiny, cache, ids, mask)
        run(tiny, baseline, ids, mask)
    assert torch.isfinite(logits).all()
    if MiniCache().pairs(cache.windows):
        assert cache.nbytes() < baseline.nbytes()
    else:  # no two adjacent full-attention layers in the deeper half
        assert cache.nbytes() == baseline.nbytes()


def test_recipes_with_minicache_print_as_they_parse():
    for text in ("minicache", "minicache:t=0.5,gamma=0.1", "kvzip+global+minicache+kivi4@0.75"):
        assert str(Recipe.parse(text)) == text
    assert not Recipe.parse("minicache").is_full
