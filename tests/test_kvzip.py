"""KVzip: the score is the peak attention of the reconstruction queries, the engine runs that
pass on a copy of the context and crops it off; ``crop`` forgets tokens as if never fed."""

from __future__ import annotations

import math

import pytest
import torch

from kvsqueeze import CompressedCache, generate, generate_batch, install
from kvsqueeze.engine import ContextTooLongError, prefill, prefill_context, split_prompt
from kvsqueeze.prefill import repeat_request
from kvsqueeze.recipe import Recipe
from kvsqueeze.scorers import NEVER_EVICT, KVzip
from kvsqueeze.scorers.base import inputs_from_tensors

CONTEXT = "The museum opens at nine. " * 12 + "The pass key is 4417. " + "Tea is served at four. " * 12


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_attention_peak_matches_blocked_attention():
    valid = torch.rand(1, 2, 16, generator=torch.Generator().manual_seed(4)) > 0.3
    inputs = inputs_from_tensors(randn(1, 2, 16, 8), randn(1, 4, 7, 8, seed=1), valid=valid)
    torch.testing.assert_close(inputs.attention_peak(block=2), inputs.attention(block=3).amax(3))


def test_kvzip_scores_the_largest_attention_of_any_query_head_and_query():
    inputs = inputs_from_tensors(randn(2, 2, 12, 8), randn(2, 6, 5, 8, seed=1))
    scores = KVzip(sinks=2).score(inputs)
    reference = inputs.attention().amax(dim=(2, 3))
    assert (scores[..., :2] == NEVER_EVICT).all()
    torch.testing.assert_close(scores[..., 2:], reference[..., 2:])


def test_kvzip_prefers_one_sharp_look_over_diffuse_attention():
    """Token 1 gets all of one query's attention, token 2 a large share of every query's: a sum of
    attention (H2O, SnapKV) prefers 2, KVzip's peak keeps 1."""
    keys = torch.zeros(1, 1, 4, 2)
    keys[0, 0, 1] = torch.tensor([30.0, 0.0])
    keys[0, 0, 2] = torch.tensor([0.0, 3.0])
    queries = torch.tensor([[1.0, 0.0]] + [[0.0, 1.0]] * 5).reshape(1, 1, 6, 2)
    inputs = inputs_from_tensors(keys, queries)
    inputs.query_slots = torch.full((1, 6), 3)
    scores = KVzip(sinks=0).score(inputs)
    mass = inputs.attention_mass().sum(2)
    assert mass[0, 0, 2] > mass[0, 0, 1] and scores[0, 0, 1] > scores[0, 0, 2]


def test_reconstruction_pass_scores_the_copy_and_leaves_only_context(tiny, monkeypatch):
    model, tokenizer = tiny
    install(model)
    context_text, _ = split_prompt(tokenizer, CONTEXT, "What is the pass key?")
    ids = torch.tensor([tokenizer.encode(context_text, add_special_tokens=False)])
    length = ids.shape[1]
    request, header = repeat_request(tokenizer)
    seen, observed = [], []
    original_score, original_observe = KVzip.score, CompressedCache.observe

    def scoring(self, inputs):
        scores = original_score(self, inputs)
        seen.append((inputs.protected[0, 0].sum().item(), scores))
        return scores

    def observing(self, layer_idx, observation):
        observed.append(list(observation.new_slots))
        original_observe(self, layer_idx, observation)

    monkeypatch.setattr(KVzip, "score", scoring)
    monkeypatch.setattr(CompressedCache, "observe", observing)
    cache = CompressedCache(Recipe.parse("kvzip@0.5"))
    prefill_context(model, tokenizer, cache, ids, torch.ones_like(ids))

    copy_length = len(request) + length - len(header)
    assert len(seen) == len(observed) == len(cache.layers) == 2
    # the attention peaks come from the queries of the copy's forward, the only one observed
    assert observed == [list(range(length, length + copy_length))] * 2
    assert [protected for protected, _ in seen] == [copy_length] * 2
    assert cache.get_seq_length() == length
    for layer, (_, scores) in zip(cache.layers, seen, strict=True):
        assert (layer.held_lengths() == math.ceil(0.5 * length)).all()
        for head in range(layer.held_lengths().shape[1]):
            kept = set(layer.view().slots[0, head].tolist())
            best = scores[0, head, :length].topk(math.ceil(0.5 * length)).indices.tolist()
            assert kept == set(best)


def test_kvzip_needs_the_tokenizer_and_ignores_query_awareness(tiny):
    model, tokenizer = tiny
    install(model)
    ids = torch.tensor([tokenizer.encode(CONTEXT)])
    with pytest.raises(ValueError, match="tokenizer"):
        prefill_context(model, None, CompressedCache(Recipe.parse("kvzip@0.5")), ids, torch.ones_like(ids))
    agnostic = generate(model, tokenizer, CONTEXT, "What is the pass key?", "kvzip@0.5", max_new_tokens=4)
    aware = generate(
        model, tokenizer, CONTEXT, "What is the pass key?", "kvzip@0.5", query_aware=True, max_new_tokens=4
    )
    assert (aware.answer, aware.kv_bytes) == (agnostic.answer, agnostic.kv_bytes)
    full = generate(model, tokenizer, CONTEXT, "What is the pass key?", max_new_tokens=1)
    assert agnostic.kv_bytes_full == full.kv_bytes_full


def test_a_context_longer_than_half_the_window_is_refused_before_any_work(tiny, monkeypatch):
    model, tokenizer = tiny
    install(model)
    ids = torch.tensor([tokenizer.encode(CONTEXT)])
    cache = CompressedCache(Recipe.parse("kvzip@0.5"))
    monkeypatch.setattr(model.config, "max_position_embeddings", 2 * ids.shape[1])
    with pytest.raises(ContextTooLongError, match="feeding it twice"):
        prefill_context(model, tokenizer, cache, ids, torch.ones_like(ids))
    assert cache.get_seq_length() == 0
    prefill_context(model, tokenizer, CompressedCache(Recipe.parse("snapkv@0.5")), ids, torch.ones_like(ids))


def _feed_with_junk(model, cache, context, junk, question, crop: bool) -> torch.Tensor:
    """Context (compressed), then ``junk`` uncompressed and cropped off if ``crop``, then the question."""
    prefill(model, cache, context, torch.ones_like(context))
    if crop:
        with cache.settings(compress_prefill=False):
            prefill(model, cache, junk, torch.ones(1, context.shape[1] + junk.shape[1], dtype=torch.long))
        cache.crop(-junk.shape[1])
    with cache.settings(compress_prefill=False):
        mask = torch.ones(1, context.shape[1] + question.shape[1], dtype=torch.long)
        return prefill(model, cache, question, mask)


@pytest.mark.parametrize("recipe", ["full", "snapkv@0.5", "kivi2"])
def test_crop_forgets_the_tail_as_if_it_was_never_fed(tiny, recipe):
    model, _ = tiny
    install(model)
    context, junk, question = (
        torch.randint(5, 1000, (1, n), generator=torch.Generator().manual_seed(n)) for n in (80, 40, 6)
    )
    cropped, clean = CompressedCache(Recipe.parse(recipe)), CompressedCache(Recipe.parse(recipe))
    after_crop = _feed_with_junk(model, cropped, context, junk, question, crop=True)
    without = _feed_with_junk(model, clean, context, junk, question, crop=False)
    assert cropped.get_seq_length() == clean.get_seq_length() == 86
    for layer in cropped.layers:
        assert int(layer.view().slots.max()) == 85
    if recipe == "kivi2":
        # context tokens the junk pushed out of the 16-bit window stay quantized
        assert cropped.nbytes() < clean.nbytes()
    else:
        torch.testing.assert_close(after_crop, without)
        assert cropped.nbytes() == clean.nbytes()


def test_quantizer_packs_only_what_the_reconstruction_pass_kept(tiny):
    """Quantization waits for the crop: every quantized group is whole (none thinned by eviction
    after it got its scales) and each head's recent window is what a one-shot prefill leaves."""
    model, tokenizer = tiny
    install(model)
    ids = torch.tensor([tokenizer.encode(CONTEXT)])
    cache = CompressedCache(Recipe.parse("kvzip+kivi2:group_size=8,residual=8@0.5"))
    prefill_context(model, tokenizer, cache, ids, torch.ones_like(ids))
    kept = math.ceil(0.5 * ids.shape[1])
    for layer in cache.layers:
        quantized = layer.quantized[0]
        assert (layer.held_lengths() == kept).all()
        assert (quantized.count == (kept - 8) // 8 * 8).all()
        assert (quantized.blocks * 8 == quantized.count).all()  # whole blocks only
        assert (layer.dense.count == kept - quantized.count).all()


def test_batched_reconstruction_matches_each_context_alone(tiny):
    model, tokenizer = tiny
    install(model)
    pairs = [(CONTEXT, "What is the pass key?"), ("Short note: the door code is 12. " * 4, "Code?")]
    batch = generate_batch(model, tokenizer, pairs, "kvzip+words@0.5", max_new_tokens=5)
    for (context, question), together in zip(pairs, batch, strict=True):
        alone = generate(model, tokenizer, context, question, "kvzip+words@0.5", max_new_tokens=5)
        assert together.answer == alone.answer
        assert together.tokens_kept > 0
