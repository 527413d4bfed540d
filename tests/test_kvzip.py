"""KVzip: the score is the peak attention of the reconstruction queries, the engine runs that
pass on a copy of the context and crops it off; ``crop`` forgets tokens as if never fed."""

from __future__ import annotations

import math

import pytest
import torch

from kvsqueeze import CompressedCache, generate, generate_batch, install
from kvsqueeze.compression import COMBINED_OVER_FORWARDS, Observation, merge_observations
from kvsqueeze.engine import ContextTooLongError, prefill, prefill_context, split_prompt
from kvsqueeze.prefill import SMALLEST_CHUNK, ReconstructionPrefill, RepeatRequests
from kvsqueeze.recipe import Recipe, RecipeError
from kvsqueeze.scorers import NEVER_EVICT, KVzip
from kvsqueeze.scorers.base import ScoringInputs, inputs_from_tensors, visible_columns

CONTEXT = "The museum opens at nine. " * 12 + "The pass key is 4417. " + "Tea is served at four. " * 12


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_attention_peak_matches_blocked_attention():
    valid = torch.rand(1, 2, 16, generator=torch.Generator().manual_seed(4)) > 0.3
    inputs = inputs_from_tensors(randn(1, 2, 16, 8), randn(1, 4, 7, 8, seed=1), valid=valid)
    torch.testing.assert_close(inputs.attention_peak(block=2), inputs.attention(block=3).amax(3))


def plain_softmax(inputs: ScoringInputs, start: int = 0) -> torch.Tensor:
    """``[B, Hkv, n_rep, q, L]``: the whole masked softmax at once, the reference to match."""
    batch, kv_heads, _, dim = inputs.keys.shape
    queries = inputs.queries[:, :, start:].reshape(batch, kv_heads, inputs.n_rep, -1, dim)
    logits = torch.einsum("bhrqd,bhld->bhrql", queries, inputs.keys) * inputs.scaling
    logits = logits.masked_fill(~inputs.query_mask(start)[:, :, None], -math.inf)
    return logits.softmax(-1).nan_to_num(0.0)


def awkward_inputs() -> ScoringInputs:
    """GQA (3 query heads per KV head), 9 queries that are the last 9 of 20 candidates, invalid
    entries, left padding in row 0, ragged padding in row 1, and row 0 head 1's first query
    seeing no valid candidate."""
    generator = torch.Generator().manual_seed(5)
    valid = torch.rand(2, 2, 20, generator=generator) > 0.3
    valid[0, :, :3] = False
    valid[0, 1, :12] = False
    valid[1, 1, -4:] = False
    slots = torch.arange(20).repeat(2, 2, 1)
    slots[1, 1, -4:] = -1
    return inputs_from_tensors(randn(2, 2, 20, 8), 3 * randn(2, 6, 9, 8, seed=1), valid=valid, slots=slots)


@pytest.mark.parametrize("block", [2, 4, 256])
def test_attention_statistics_match_the_plain_softmax(block):
    inputs = awkward_inputs()
    probs = plain_softmax(inputs)
    assert probs[0, 1, :, 0].sum() == 0  # the query that sees nothing
    peak = inputs.attention_peak(block=block)
    assert not peak.isnan().any()
    torch.testing.assert_close(peak, probs.amax(3), rtol=0, atol=1e-6)
    torch.testing.assert_close(inputs.attention_mass(block=block), probs.sum(3), rtol=0, atol=1e-6)
    torch.testing.assert_close(inputs.attention_peak(last=5, block=block), plain_softmax(inputs, 4).amax(3))
    torch.testing.assert_close(inputs.attention(block=block), probs, rtol=0, atol=1e-6)


def test_visible_columns_split_older_shared_columns_from_the_causal_ones():
    slots = torch.tensor([[[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, -1, -1]]])
    assert visible_columns(slots, torch.tensor([[2, 3]])) == (2, 4)
    assert visible_columns(slots, torch.tensor([[5]])) == (4, 6)  # head 1's tail is padding


def _observation(length: int, seed: int) -> Observation:
    statistics = {
        name: randn(1, 2, 3, length, seed=seed + i) for i, name in enumerate(COMBINED_OVER_FORWARDS)
    }
    empty = torch.zeros(1, 0, dtype=torch.long)
    return Observation(
        torch.zeros(1, 6, 0, 8), empty, empty, 1.0, None, range(length - 3, length), statistics
    )


def test_deferred_forwards_combine_peaks_by_max_and_masses_by_sum_over_shared_slots():
    earlier, later = _observation(10, seed=0), _observation(7, seed=5)
    merged = merge_observations(earlier, later)
    peak, mass = merged.statistics["attention_peak"], merged.statistics["attention_mass"]
    torch.testing.assert_close(
        peak, torch.maximum(earlier.statistics["attention_peak"][..., :7], later.statistics["attention_peak"])
    )
    torch.testing.assert_close(
        mass, earlier.statistics["attention_mass"][..., :7] + later.statistics["attention_mass"]
    )
    assert merged.new_slots == later.new_slots
    longer = merge_observations(later, earlier).statistics["attention_peak"]
    torch.testing.assert_close(longer[..., 7:], earlier.statistics["attention_peak"][..., 7:])


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
    requests = RepeatRequests.of(tokenizer)
    request, header = requests.first, requests.header
    seen, observed = [], []
    original_score, original_observe = KVzip.score, CompressedCache.observe

    def scoring(self, inputs):
        scores = original_score(self, inputs)
        seen.append(scores)
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
    # the attention peaks come from the queries of the copy's forward, the only one observed; the
    # copy is cropped off before the compression, so only the context is scored
    assert observed == [list(range(length, length + copy_length))] * 2
    assert [scores.shape[-1] for scores in seen] == [length] * 2
    assert cache.get_seq_length() == length
    for layer, scores in zip(cache.layers, seen, strict=True):
        assert (layer.held_lengths() == math.ceil(0.5 * length)).all()
        for head in range(layer.held_lengths().shape[1]):
            kept = set(layer.view().slots[0, head].tolist())
            best = scores[0, head].topk(math.ceil(0.5 * length)).indices.tolist()
            assert kept == set(best)


def _one_pass_reference(model, tokenizer, recipe: str, ids: torch.Tensor) -> CompressedCache:
    """KVzip as one pass: the context uncompressed, then the repeat request and the whole copy in
    one forward compressed with the copy protected, then the copy cropped off."""
    requests = RepeatRequests.of(tokenizer)
    request, header = requests.first, requests.header
    copy = torch.tensor([request + ids[0, len(header) :].tolist()])
    cache = CompressedCache(Recipe.parse(recipe))
    with cache.settings(compress_prefill=False):
        prefill(model, cache, ids, torch.ones_like(ids))
    cache.count_context(torch.tensor([ids.shape[1]]))
    with cache.settings(protect_from=ids.shape[1]):
        prefill(model, cache, copy, torch.ones(1, ids.shape[1] + copy.shape[1], dtype=torch.long))
    cache.crop(-copy.shape[1])
    return cache


def _kept_slots(cache: CompressedCache) -> list[list[set[int]]]:
    return [
        [set(layer.view().slots[0, head].tolist()) for head in range(layer.held_lengths().shape[1])]
        for layer in cache.layers
    ]


@pytest.mark.parametrize("recipe", ["kvzip@0.5", "kvzip+global@0.75"])
def test_a_chunk_as_long_as_the_context_keeps_what_one_pass_keeps(tiny, recipe):
    model, tokenizer = tiny
    install(model)
    context_text, _ = split_prompt(tokenizer, CONTEXT, "What is the pass key?")
    ids = torch.tensor([tokenizer.encode(context_text, add_special_tokens=False)])
    reference = _one_pass_reference(model, tokenizer, recipe, ids)
    chunked = CompressedCache(Recipe.parse(recipe.replace("kvzip", f"kvzip:chunk={ids.shape[1]}")))
    prefill_context(model, tokenizer, chunked, ids, torch.ones_like(ids))
    assert _kept_slots(chunked) == _kept_slots(reference)
    assert chunked.nbytes() == reference.nbytes()
    shorter = CompressedCache(Recipe.parse(recipe.replace("kvzip", "kvzip:chunk=32")))
    prefill_context(model, tokenizer, shorter, ids, torch.ones_like(ids))
    assert _kept_slots(shorter) != _kept_slots(reference)  # the pieces' queries do score differently


def _plain_peak(inputs: ScoringInputs, last: int | None = None, block: int = 256) -> torch.Tensor:
    if last is None and "attention_peak" in inputs.observed:
        return inputs.observed["attention_peak"]
    return plain_softmax(inputs, inputs.num_queries - (last or inputs.num_queries)).amax(3)


@pytest.mark.parametrize("recipe", ["kvzip:chunk=32@0.5", "kvzip+global@0.75"])
def test_kvzip_keeps_what_the_plain_softmax_peak_keeps(tiny, recipe, monkeypatch):
    model, tokenizer = tiny
    install(model)
    context_text, _ = split_prompt(tokenizer, CONTEXT, "What is the pass key?")
    ids = torch.tensor([tokenizer.encode(context_text, add_special_tokens=False)])
    fast = CompressedCache(Recipe.parse(recipe))
    prefill_context(model, tokenizer, fast, ids, torch.ones_like(ids))
    monkeypatch.setattr(ScoringInputs, "attention_peak", _plain_peak)
    plain = CompressedCache(Recipe.parse(recipe))
    prefill_context(model, tokenizer, plain, ids, torch.ones_like(ids))
    assert _kept_slots(fast) == _kept_slots(plain)


def _peak_while_prefilling(
    model, tokenizer, cache: CompressedCache, ids: torch.Tensor
) -> tuple[int, list[int]]:
    """Most bytes ``cache`` held at the end of any forward of ``prefill_context``, and each
    forward's length."""
    peaks, lengths = [0], []

    def record(module, args, kwargs, output):
        peaks.append(max(peaks[-1], cache.nbytes()))
        lengths.append(kwargs["input_ids"].shape[1])

    hook = model.base_model.register_forward_hook(record, with_kwargs=True)
    try:
        prefill_context(model, tokenizer, cache, ids, torch.ones_like(ids))
    finally:
        hook.remove()
    return peaks[-1], lengths


def _bytes_holding(model, tokens: int) -> int:
    """What an uncompressed cache holds after a forward of ``tokens`` tokens."""
    cache = CompressedCache()
    prefill(model, cache, torch.full((1, tokens), 7), torch.ones(1, tokens, dtype=torch.long))
    return cache.nbytes()


def test_a_context_longer_than_half_the_window_compresses_holding_one_piece_of_copy(tiny, monkeypatch):
    model, tokenizer = tiny
    install(model)
    ids = torch.tensor([tokenizer.encode(CONTEXT)])
    length, request = ids.shape[1], RepeatRequests.of(tokenizer).longest
    room = SMALLEST_CHUNK + 6
    window = length + request + room
    monkeypatch.setattr(model.config, "max_position_embeddings", window)
    assert 2 * length > window
    cache = CompressedCache(Recipe.parse("kvzip@0.5"))
    peak, lengths = _peak_while_prefilling(model, tokenizer, cache, ids)

    assert lengths[0] == length and len(lengths) > 2  # the context, then pieces of copy
    assert max(lengths[1:]) <= request + room  # the default 2048-token chunk shrank to fit
    assert all(length + fed <= window for fed in lengths[1:])
    assert _bytes_holding(model, length) < peak <= _bytes_holding(model, length + request + room)
    assert cache.get_seq_length() == length
    for layer in cache.layers:
        assert (layer.held_lengths() == math.ceil(0.5 * length)).all()


def test_global_threshold_over_chunks_keeps_the_ratio_of_the_context(tiny):
    model, tokenizer = tiny
    install(model)
    ids = torch.tensor([tokenizer.encode(CONTEXT)])
    cache = CompressedCache(Recipe.parse("kvzip:chunk=32+global@0.75"))
    _, lengths = _peak_while_prefilling(model, tokenizer, cache, ids)
    assert len(lengths) > 2
    per_head = math.ceil(0.25 * ids.shape[1])
    heads = [layer.held_lengths() for layer in cache.layers]
    assert sum(int(held.sum()) for held in heads) == per_head * sum(held.numel() for held in heads)
    assert len({int(n) for held in heads for n in held.flatten()}) > 1  # not a uniform share


def test_a_context_with_no_room_for_a_small_piece_is_refused_before_any_work(tiny, monkeypatch):
    model, tokenizer = tiny
    install(model)
    ids = torch.tensor([tokenizer.encode(CONTEXT)])
    strategy = ReconstructionPrefill(tokenizer)
    cache = CompressedCache(Recipe.parse("kvzip@0.5"))
    fits = strategy.positions_needed(ids.shape[1])
    assert fits == ids.shape[1] + strategy.requests.longest + SMALLEST_CHUNK
    monkeypatch.setattr(model.config, "max_position_embeddings", fits - 1)
    with pytest.raises(ContextTooLongError, match=f"at most {ids.shape[1] - 1}"):
        prefill_context(model, tokenizer, cache, ids, torch.ones_like(ids))
    assert cache.get_seq_length() == 0
    monkeypatch.setattr(model.config, "max_position_embeddings", fits)
    prefill_context(model, tokenizer, cache, ids, torch.ones_like(ids))
    assert cache.get_seq_length() == ids.shape[1]


def test_chunk_out_of_range_is_an_error():
    with pytest.raises(RecipeError, match="kvzip:chunk must be"):
        Recipe.parse("kvzip:chunk=8@0.5")
    assert Recipe.parse("kvzip:chunk=512@0.5").prefill_strategy().chunk == 512


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


@pytest.mark.parametrize("recipe", ["kvzip+words@0.5", "kvzip:chunk=24+words@0.5"])
def test_batched_reconstruction_matches_each_context_alone(tiny, recipe):
    """With short pieces the rows need different numbers of reconstruction forwards."""
    model, tokenizer = tiny
    install(model)
    pairs = [(CONTEXT, "What is the pass key?"), ("Short note: the door code is 12. " * 4, "Code?")]
    batch = generate_batch(model, tokenizer, pairs, recipe, max_new_tokens=5)
    for (context, question), together in zip(pairs, batch, strict=True):
        alone = generate(model, tokenizer, context, question, recipe, max_new_tokens=5)
        assert together.answer == alone.answer
        assert together.tokens_kept > 0
