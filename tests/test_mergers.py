"""Merging (`d2o`, `kvmerger`): evicted tokens folded into kept ones, the same bytes held."""

from __future__ import annotations

import math

import pytest
import torch
from test_cache import run
from tiny_models import ARCHITECTURES, padded_batch, tiny_model

from kvsqueeze.attention import install
from kvsqueeze.budgets.base import LayerRanking
from kvsqueeze.cache import CompressedCache
from kvsqueeze.compression import merge_dropped
from kvsqueeze.mergers import D2O, KVMerger
from kvsqueeze.recipe import Recipe, RecipeError

KIVI = "kivi4:group_size=8,residual=4"


def one_head(*rows: list[float]) -> torch.Tensor:
    """``[1, 1, L, D]`` from ``L`` rows of ``D`` numbers."""
    return torch.tensor(rows)[None, None]


def mask(*flags: int) -> torch.Tensor:
    return torch.tensor(flags, dtype=torch.bool)[None, None]


def test_d2o_merges_an_evicted_token_into_its_most_similar_kept_one_with_the_papers_weights():
    # kept: k0 = (1, 0), k1 = (0, 1); evicted: (4, 3) (cosine 0.8 to k0, 0.6 to k1) and (-1, -1)
    # (cosine -0.71 to both). The threshold is their mean, 0.046: only (4, 3) is merged, into k0.
    keys = one_head([1.0, 0.0], [0.0, 1.0], [4.0, 3.0], [-1.0, -1.0])
    values = one_head([1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0])
    keep, dropped = mask(1, 1, 0, 0), mask(0, 0, 1, 1)
    merged_keys, merged_values, absorbed = D2O().merge(
        keys, values, keep, dropped, keep, torch.zeros(1, 1, 4)
    )
    own, other = math.e, math.exp(0.8)
    expected_key = (own * torch.tensor([1.0, 0.0]) + other * torch.tensor([4.0, 3.0])) / (own + other)
    expected_value = (own * torch.tensor([1.0, 2.0]) + other * torch.tensor([5.0, 6.0])) / (own + other)
    assert absorbed.tolist() == [[[True, False, False, False]]]
    torch.testing.assert_close(merged_keys[0, 0, 0], expected_key)
    torch.testing.assert_close(merged_values[0, 0, 0], expected_value)
    assert torch.equal(merged_keys[0, 0, 1:], keys[0, 0, 1:])  # k1 (and the evicted rows) unchanged
    assert torch.equal(merged_values[0, 0, 1:], values[0, 0, 1:])


def test_d2o_never_merges_into_a_kept_token_that_is_not_a_target():
    # k0 is kept but quantized (not in 16-bit storage): (4, 3) goes to k1, its second best, 0.6
    keys = one_head([1.0, 0.0], [0.0, 1.0], [4.0, 3.0])
    values = one_head([1.0, 2.0], [3.0, 4.0], [5.0, 6.0])
    keep = mask(1, 1, 0)
    _, merged_values, absorbed = D2O().merge(
        keys, values, keep, mask(0, 0, 1), mask(0, 1, 0), torch.zeros(1, 1, 3)
    )
    assert absorbed.tolist() == [[[False, True, False]]]
    own, other = math.e, math.exp(0.6)
    expected = (own * torch.tensor([3.0, 4.0]) + other * torch.tensor([5.0, 6.0])) / (own + other)
    torch.testing.assert_close(merged_values[0, 0, 1], expected)


def test_kvmerger_merges_only_within_a_run_of_similar_consecutive_keys_into_its_best_kept_token():
    # runs (neighbour cosine >= 0.8): {0, 1, 2}, {3, 4}, {5}. Kept: 0 (score 1), 2 (score 5), 4.
    # 1 goes into 2 (the run's best kept token, not its kept neighbour 0), 3 into 4; 5 is as
    # similar to run {0, 1, 2} as 1 is, but its run has no kept token: it is dropped.
    keys = one_head([1.0, 0.0], [1.0, 0.1], [1.0, 0.2], [-1.0, 0.5], [-1.0, 0.6], [1.0, 0.05])
    values = torch.arange(12.0).view(1, 1, 6, 2)
    keep, dropped = mask(1, 0, 1, 0, 1, 0), mask(0, 1, 0, 1, 0, 1)
    scores = torch.tensor([1.0, 9.0, 5.0, 9.0, 3.0, 9.0])[None, None]
    merged_keys, merged_values, absorbed = KVMerger().merge(keys, values, keep, dropped, keep, scores)
    assert absorbed.tolist() == [[[False, False, True, False, True, False]]]
    # one merged key per run at distance 0.1 from its pivot: sigma = 0.1, weight exp(-1/2)
    weight = math.exp(-0.5)
    for pivot, merged in ((2, 1), (4, 3)):
        expected_key = (keys[0, 0, pivot] + weight * keys[0, 0, merged]) / (1 + weight)
        expected_value = (values[0, 0, pivot] + weight * values[0, 0, merged]) / (1 + weight)
        torch.testing.assert_close(merged_keys[0, 0, pivot], expected_key)
        torch.testing.assert_close(merged_values[0, 0, pivot], expected_value)
    assert torch.equal(merged_values[0, 0, 0], values[0, 0, 0])


def test_kvmerger_weights_each_member_by_a_gaussian_of_its_distance_with_sigma_their_mean():
    # pivot (1, 0) kept; evicted (1, 0.1) and (1, 0.3) at distances 0.1 and 0.3: sigma = 0.2
    keys = one_head([1.0, 0.1], [1.0, 0.0], [1.0, 0.3])
    values = one_head([1.0], [2.0], [4.0])
    keep = mask(0, 1, 0)
    _, merged_values, _ = KVMerger().merge(keys, values, keep, mask(1, 0, 1), keep, torch.zeros(1, 1, 3))
    near, far = math.exp(-(0.1**2) / (2 * 0.2**2)), math.exp(-(0.3**2) / (2 * 0.2**2))
    expected = (2.0 + near * 1.0 + far * 4.0) / (1 + near + far)
    torch.testing.assert_close(merged_values[0, 0, 1, 0], torch.tensor(expected))


def prefilled(recipe: str, model, chunk_size: int | None = None) -> tuple[CompressedCache, torch.Tensor]:
    ids, attention = padded_batch([48, 36], seed=5)
    cache = CompressedCache(Recipe.parse(recipe))
    with torch.no_grad():
        logits = run(model, cache, ids, attention, chunk_size)
    return cache, logits


def held(cache: CompressedCache, name: str) -> list[dict[int, torch.Tensor]]:
    """Per layer, ``{(row, head, slot): key or value}`` of every held token."""
    out = []
    for layer in cache.layers:
        view = layer.view()
        tensor = view.keys if name == "keys" else view.values
        where = (view.slots >= 0).nonzero().tolist()
        out.append({(b, h, int(view.slots[b, h, i])): tensor[b, h, i] for b, h, i in where})
    return out


@pytest.mark.parametrize("chunk_size", [None, 16])
@pytest.mark.parametrize(
    ("merge", "quantizer"), [("d2o", ""), ("kvmerger:threshold=0", ""), ("d2o", f"+{KIVI}")]
)
def test_a_merge_holds_the_bytes_and_tokens_of_the_same_eviction_and_changes_kept_values(
    merge, quantizer, chunk_size
):
    model = install(tiny_model("llama"))
    evicting, plain_logits = prefilled(f"snapkv:window=4{quantizer}@0.5", model, chunk_size)
    merging, merged_logits = prefilled(f"snapkv:window=4+{merge}{quantizer}@0.5", model, chunk_size)
    assert merging.nbytes() == evicting.nbytes() and merging.tokens_kept() == evicting.tokens_kept()
    changed = 0
    for plain, merged, layer in zip(
        held(evicting, "values"), held(merging, "values"), merging.layers, strict=True
    ):
        layer.validate()
        if chunk_size is None:  # in chunks, merged keys of one chunk change the next chunk's scores
            assert plain.keys() == merged.keys()  # the same tokens kept
        changed += sum(not torch.equal(plain[token], merged[token]) for token in plain.keys() & merged.keys())
    assert changed > 0
    assert not torch.allclose(plain_logits, merged_logits)


def test_quantized_tokens_are_never_merged_into_nor_re_encoded():
    model = install(tiny_model("llama"))
    cache, _ = prefilled(f"knorm+d2o+{KIVI}@0.5", model, chunk_size=16)
    layer = cache.layers[0]
    view = layer.view()
    assert bool((~view.in_dense & (view.slots >= 0)).any())  # some tokens are quantized
    held = view.slots >= 0
    keep = held & (~view.in_dense | (view.slots % 2 == 1))  # drop the even 16-bit tokens
    ranking = LayerRanking(
        0, torch.zeros_like(view.slots, dtype=torch.float), held, ~held, keep.sum(-1), None
    )
    before = [{name: field.clone() for name, field in tier.pool.fields.items()} for tier in layer.quantized]
    dense_values = view.values.clone()
    merge_dropped(layer, view, ranking, keep, cache.recipe.merge)
    for tier, fields in zip(layer.quantized, before, strict=True):
        assert all(torch.equal(tier.pool.fields[name], field) for name, field in fields.items())
    after = layer.view()
    assert torch.equal(after.values[~view.in_dense & held], dense_values[~view.in_dense & held])
    assert not torch.equal(after.values[view.in_dense & keep], dense_values[view.in_dense & keep])
    with pytest.raises(ValueError, match="only tokens in 16-bit storage"):
        layer.rewrite(view, {"keys": view.keys, "values": view.values}, held & ~view.in_dense)
    layer.keep(view, keep)
    layer.validate()


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("merge", ["d2o", "kvmerger:threshold=0"])
def test_merges_hold_the_bytes_of_plain_eviction_on_every_architecture(arch, merge):
    """Sliding-window (compressed with ``sliding``) and hybrid layers too: the layers stay consistent
    and the merge was applied (some layer's held values differ from plain eviction's)."""
    model = install(tiny_model(arch))
    evicting, _ = prefilled("snapkv:window=4+sliding@0.5", model)
    merging, logits = prefilled(f"snapkv:window=4+{merge}+sliding@0.5", model)
    for layer in merging.layers:
        layer.validate()
    assert merging.nbytes() == evicting.nbytes() and bool(torch.isfinite(logits).all())
    full, _ = prefilled("full", model)
    assert merging.nbytes() < full.nbytes()
    merged = [
        not torch.equal(m.view().values, e.view().values)
        for m, e in zip(merging.layers, evicting.layers, strict=True)
    ]
    assert any(merged)  # on mistral and phi3 every layer slides


def test_tokens_the_last_query_cannot_see_are_not_merged():
    model = install(tiny_model("llama"))
    cache, _ = prefilled("snapkv+kvmerger:threshold=-1@0.5", model)  # one run per head: all merge
    layer = cache.layers[0]
    view = layer.view()
    held = view.slots >= 0
    keep = held & (view.slots % 2 == 1)
    merged = []
    for visible in (keep, held):  # the dropped tokens outside, then inside the last query's view
        ranking = LayerRanking(0, view.slots.float(), visible, ~held, keep.sum(-1), None)
        merge_dropped(layer, view, ranking, keep, cache.recipe.merge)
        merged.append(not torch.equal(layer.view().values, view.values))
    assert merged == [False, True]


@pytest.mark.parametrize("merge", ["d2o", "kvmerger"])
def test_ratio_zero_with_a_merge_is_the_full_cache(merge):
    model = install(tiny_model("llama"))
    full, full_logits = prefilled("full", model, chunk_size=16)
    merging, logits = prefilled(f"snapkv+{merge}@0", model, chunk_size=16)
    assert torch.equal(logits, full_logits)
    assert merging.nbytes() == full.nbytes()


@pytest.mark.parametrize(
    "text",
    ["snapkv+d2o@0.5", "snapkv:window=8+kvmerger:threshold=0.7@0.75", "kvzip+global+words+d2o+kivi2@0.8"],
)
def test_recipes_with_a_merge_print_as_they_parse(text):
    recipe = Recipe.parse(text)
    assert str(recipe) == text and str(Recipe.parse(str(recipe))) == text
    assert isinstance(recipe.merge, D2O | KVMerger)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("d2o", "d2o merges what a scorer evicts"),
        ("snapkv+d2o+kvmerger@0.5", "two merges"),
        ("snapkv+mixed+d2o@0.5", "nothing left for d2o to merge"),
        ("snapkv+kvmerger:threshold=1.5@0.5", r"kvmerger:threshold must be in \[-1.0, 1.0\], got 1.5"),
        ("snapkv+d2o:threshold=0.5@0.5", "bad option 'threshold=0.5' for d2o"),
    ],
)
def test_bad_merge_recipes_are_errors(text, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.parse(text)
