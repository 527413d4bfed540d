"""``words``: tokens of one whitespace-delimited word rank, and are kept or dropped, together."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze import CompressedCache, install
from kvsqueeze.engine import prefill, prefill_context
from kvsqueeze.recipe import Recipe, RecipeError
from kvsqueeze.selection import keep_mask
from kvsqueeze.units import WholeWords, pool_by_unit, token_texts

CONTEXT = (
    "Visitors arrive at nine. " * 10 + "The pass key is 4417093, said happy-otter. " + "Tea at four. " * 10
)


def test_words_begin_at_whitespace_and_keep_digits_and_hyphens_together():
    texts = [" The", " key", " is", " ", "4", "4", "1", ".", " happy", "-", "otter", "\n", "Tea"]
    begins = WholeWords().starts(texts)
    assert begins == [True, True, True, True, True, False, False, False, True, False, False, True, True]


def test_token_texts_rebuild_the_text_with_its_spaces(tokenizer):
    ids = tokenizer.encode(CONTEXT)
    texts = token_texts(tokenizer, ids)
    assert "".join(texts) == tokenizer.decode(ids)
    assert len(texts) == len(ids) and " pass" in texts


def test_unit_ids_point_at_each_words_first_token_and_padding_stands_alone(tokenizer):
    row = tokenizer.encode(" key 4417093 now")
    ids = torch.tensor([[0, 0, *row]])
    mask = torch.tensor([[0, 0] + [1] * len(row)])
    units = WholeWords().unit_ids(tokenizer, ids, mask)[0].tolist()
    texts = token_texts(tokenizer, row)
    digits = [2 + i for i, text in enumerate(texts) if text.strip().isdigit()]
    assert len(digits) == 7 and {units[i] for i in digits} == {digits[0]}
    assert units[:2] == [0, 1] and units[-1] == len(units) - 1


def test_pooling_keeps_a_word_whole_where_single_tokens_would_split_it():
    scores = torch.tensor([[[0.1, 0.9, 0.2, 0.3, 0.8, 0.7], [0.6, 0.1, 0.1, 0.1, 0.5, 0.9]]])
    units = torch.tensor([[[0, 1, 1, 1, 4, 5], [0, 1, 1, 1, 4, 5]]])
    valid = torch.ones_like(scores, dtype=torch.bool)
    valid[0, 1, 1] = False  # an invalid token lends its score to nobody
    pooled = pool_by_unit(scores, units, valid)
    assert pooled[0, 0].tolist() == pytest.approx([0.1, 0.9, 0.9, 0.9, 0.8, 0.7])
    assert pooled[0, 1, 2:4].tolist() == pytest.approx([0.1, 0.1])
    counts = torch.tensor([[4, 2]])
    assert keep_mask(pooled, valid, counts)[0, 0].tolist() == [False, True, True, True, True, False]
    assert keep_mask(scores, valid, counts)[0, 0].tolist() == [False, True, False, True, True, True]


def test_recipe_strings_with_a_unit():
    recipe = Recipe.parse("kvzip+adakv+words+kivi4@0.8")
    assert isinstance(recipe.unit, WholeWords) and str(recipe) == "kvzip+adakv+words+kivi4@0.8"
    with pytest.raises(RecipeError, match="add a scorer"):
        Recipe.parse("words")
    with pytest.raises(RecipeError, match="two units"):
        Recipe.parse("snapkv+words+words@0.5")


def _split_words(model, tokenizer, recipe: str) -> list[int]:
    """Per (layer, head): how many words of ``CONTEXT`` the compressed cache holds only in part."""
    ids = torch.tensor([tokenizer.encode(CONTEXT)])
    mask = torch.ones_like(ids)
    cache = CompressedCache(Recipe.parse(recipe))
    prefill_context(model, tokenizer, cache, ids, mask)
    units = WholeWords().unit_ids(tokenizer, ids, mask)[0]
    words = [torch.nonzero(units == first).flatten() for first in units.unique()]
    split = []
    for layer in cache.layers:
        assert int(layer.held_lengths().max()) < 0.6 * ids.shape[1]
        slots = layer.view().slots[0]
        for head_slots in slots:
            held = torch.zeros(ids.shape[1], dtype=torch.bool)
            held[head_slots[head_slots >= 0]] = True
            split.append(sum(1 for word in words if 0 < int(held[word].sum()) < len(word)))
    return split


@pytest.mark.parametrize("scorer", ["snapkv", "kvzip", "knorm"])
def test_every_head_keeps_words_whole_but_the_one_at_its_budget_edge(tiny, scorer):
    model, tokenizer = tiny
    install(model)
    whole = _split_words(model, tokenizer, f"{scorer}+words@0.5")
    single = _split_words(model, tokenizer, f"{scorer}@0.5")
    assert max(whole) <= 1  # the count may cut the last word taken
    if scorer != "snapkv":  # SnapKV's own pooling over neighbours already splits few words
        assert sum(single) > 2 * len(single), single


def test_a_unit_without_the_tokens_is_a_clear_error(tiny):
    model, _ = tiny
    install(model)
    ids = torch.tensor([list(range(100, 160))])
    with pytest.raises(ValueError, match="unit"):
        prefill(model, CompressedCache(Recipe.parse("snapkv+words@0.5")), ids, torch.ones_like(ids))
