"""The decode-time methods (R-KV, SCOPE, LazyEviction, MorphKV): each keeps what its paper keeps on
hand-built tensors, and each bounds the cache of a tiny model through decode_step loops."""

from __future__ import annotations

import pytest
import torch
from test_decoding import PROMPT, held_slots, run
from tiny_models import tiny_model

from kvsqueeze import install
from kvsqueeze.decoding import DECODERS, RKV, SCOPE, LazyEviction, MorphKV
from kvsqueeze.decoding.lazy import decode_recurrence, encode_recurrence
from kvsqueeze.decoding.rkv import key_redundancy
from kvsqueeze.recipe import Recipe, RecipeError
from kvsqueeze.scorers.base import ScoringInputs, inputs_from_tensors
from kvsqueeze.selection import keep_mask

ATTENDED = 12.0
"""A logit that takes nearly all of a query's attention next to logits of 0."""


def one_hot_inputs(logits: torch.Tensor, **overrides) -> ScoringInputs:
    """One KV head and one query head over ``L`` candidates with orthogonal keys: query ``j``
    gives candidate ``i`` exactly the attention logit ``logits [w, L][j, i]``."""
    width = logits.shape[1]
    keys = torch.eye(width)[None, None]
    return inputs_from_tensors(keys, (logits * width**0.5)[None, None], **overrides)


def kept(ranking: torch.Tensor, inputs: ScoringInputs, count: int) -> list[int]:
    """The candidates a head keeps out of ``inputs`` (protected ones included) given ``ranking``."""
    protected = torch.zeros_like(inputs.valid) if inputs.protected is None else inputs.protected
    keep = protected | keep_mask(ranking, inputs.valid & ~protected, torch.tensor([[count]]))
    return keep[0, 0].nonzero().flatten().tolist()


def test_rkv_drops_the_older_copies_of_a_repeated_key_that_attention_alone_keeps():
    """Tokens 0-2 share one key and are the most attended; token 3 is distinct and a little less
    attended. Attention alone keeps the three copies; R-KV keeps the latest copies and token 3."""
    dim = 8
    basis = torch.eye(dim)
    keys = torch.stack([basis[0], basis[0], basis[0], basis[1], *basis[2:6]])[None, None]
    query = dim**0.5 * (3.0 * basis[0] + 2.5 * basis[1])
    inputs = inputs_from_tensors(keys, query[None, None, None])
    rkv = RKV(window=1, kernel_size=1)
    assert kept(rkv.score(inputs), inputs, 4) == [1, 2, 3, 7]  # 7: the observed query's own token
    attention_only = RKV(window=1, kernel_size=1, lambda_=1.0)
    assert kept(attention_only.score(inputs), inputs, 4) == [0, 1, 2, 7]


def test_scope_keeps_the_prompt_the_recent_tokens_and_the_latest_querys_heavy_hitters():
    """Prompt 0-3 (frozen), generated 4-9. The query before last attended token 4, the latest
    attends tokens 5 and 6: SCOPE keeps 5, 6 and the two most recent (8, 9), drops 4 and 7."""
    logits = torch.zeros(2, 10)
    logits[0, 4] = ATTENDED
    logits[1, 5] = logits[1, 6] = ATTENDED
    prompt = torch.arange(10) < 4
    inputs = one_hot_inputs(logits, protected=prompt.expand(1, 1, 10), budget=torch.tensor([[4]]))
    assert SCOPE().frozen
    assert kept(SCOPE(recent_share=0.5).score(inputs), inputs, 4) == [0, 1, 2, 3, 5, 6, 8, 9]
    assert 4 in kept(inputs.attention_mass(last=2).mean(2), inputs, 2)  # a window of both would not drop it


@pytest.mark.parametrize(("fusion", "kept_older"), [("max", 0), ("sum", 1)])
def test_morphkv_fuses_the_recent_windows_attention_by_max_or_sum(fusion, kept_older):
    """Older tokens 0-4, window 5-7. Query 5 gives token 0 nearly all its attention; queries 6
    and 7 each give token 1 slightly less: the largest single attention picks token 0, the total
    picks token 1. With C + R = 4 the window (R = 3) and one older token are held."""
    logits = torch.zeros(3, 8)
    logits[0, 0] = ATTENDED
    logits[1, 1] = logits[2, 1] = ATTENDED - 2
    inputs = one_hot_inputs(logits)
    morph = MorphKV(window=3, fusion=fusion)
    assert kept(morph.score(inputs), inputs, 4) == [kept_older, 5, 6, 7]


def lazy_period(first_query: int, attended: dict[int, list[int]], state: torch.Tensor) -> ScoringInputs:
    """Tokens 0-7 (slots 0-7) seen by the 8 decode queries at slots ``first_query`` onwards;
    ``attended`` maps a token to the query slots that attend it. Token 0 is an attention sink,
    attended by every query, so that the others' attention is near 0 unless they are attended."""
    slots = torch.arange(first_query, first_query + 8)
    logits = torch.zeros(8, 8)
    logits[:, 0] = ATTENDED
    for token, steps in attended.items():
        for step in steps:
            if first_query <= step < first_query + 8:
                logits[step - first_query, token] = ATTENDED
    return one_hot_inputs(logits, query_slots=slots[None], query_positions=slots[None], previous_scores=state)


def test_lazy_keeps_a_periodically_reattended_token_whose_current_attention_is_low():
    """Token 3 is attended every 10 steps (slots 10, 20, 30), token 5 once at slot 38. At slot 39
    token 3 has been silent for 9 steps, within its interval: LazyEviction keeps it with the sink
    and token 5. The last period's attention ranks token 3 with the never-attended tokens."""
    attended = {3: [10, 20, 30], 5: [38]}
    lazy = LazyEviction(every=8)
    state = torch.zeros(1, 1, 8)
    for first_query in (8, 16, 24, 32):  # four periods; nothing is evicted in between
        inputs = lazy_period(first_query, attended, state)
        ranking, state = lazy.rank(inputs)
    assert kept(ranking, inputs, 3) == [0, 3, 5]
    assert 3 not in kept(inputs.attention_mass().sum(2), inputs, 3)
    last, interval = decode_recurrence(state, inputs.slots)
    assert last[0, 0].tolist() == [39, 1, 2, 30, 4, 38, 6, 7]  # never attended: its own slot
    assert interval[0, 0, 3] == 16  # the longest interval (10) rounded up to a power of two


def test_lazy_state_encodes_last_step_exactly_and_the_interval_rounded_up():
    last = torch.tensor([0, 7, 1000, 2**19])
    interval = torch.tensor([0, 1, 10, 1024])
    state = encode_recurrence(last, interval)
    assert state.dtype == torch.float32
    decoded_last, decoded_interval = decode_recurrence(state, torch.zeros_like(last))
    assert decoded_last.tolist() == last.tolist()
    assert decoded_interval.tolist() == [0, 1, 16, 1024]
    assert decode_recurrence(torch.zeros(2), torch.tensor([5, 9]))[0].tolist() == [5, 9]  # new tokens


def test_lazy_cannot_share_the_token_state_with_a_stateful_prefill_scorer():
    with pytest.raises(RecipeError, match="stateful"):
        Recipe.parse("h2o@0.5+lazy")
    assert Recipe.parse("snapkv@0.5+lazy:budget=64,every=16").decoding.stateful


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {arch: install(tiny_model(arch)) for arch in ("llama", "mistral", "gemma3")}


METHODS = ["rkv", "scope", "lazy", "morphkv:window=4"]


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.filterwarnings(
    "ignore:recipe .* compresses no layer of this model"
)  # mistral: every layer slides
def test_every_method_bounds_each_head_during_decoding(models, method, arch):
    """Full-attention layers hold at most budget + every generated (or held) tokens per head; a
    sliding layer (left alone: the recipe lacks ``sliding``) holds no more than it does under the
    generic ``decode`` component."""
    name, _, options = method.partition(":")
    text = f"{name}:{','.join(filter(None, (options, 'budget=16,every=4')))}"
    component = Recipe.parse(text).decoding
    frozen = "frozen=true" if component.frozen else "frozen=false"
    steps = 24
    cache, held, _ = run(None, text, steps=steps, arch_model=models[arch])
    _, generic, _ = run(None, f"decode:budget=16,every=4,{frozen}", steps=steps, arch_model=models[arch])
    full = [i for i, layer in enumerate(cache.layers) if layer.window is None]
    prompt = PROMPT if component.frozen else 0
    for step, (h, g) in enumerate(zip(held, generic, strict=True)):
        assert bool((h <= g).all())
        if full:
            most = int(h[:, full].max())
            assert most <= component.most_held(PROMPT, PROMPT, step + 1)
            assert step < 3 or most <= prompt + 16 + 4
    if full:  # a compression keeps the budget, not fewer
        assert int(held[-1][:, full].min()) == prompt + 16 + steps % 4
    if component.frozen and full:
        assert set(range(PROMPT)) <= set(held_slots(cache, layer=full[0]))


@pytest.mark.parametrize("name", sorted(set(DECODERS) - {"decode"}))
def test_every_method_composes_with_prefill_eviction(models, name):
    cache, held, _ = run(None, f"snapkv@0.5+{name}:budget=16,every=4", steps=16, arch_model=models["llama"])
    prompt = PROMPT // 2 if cache.recipe.decoding.frozen else 0
    assert all(int(h.max()) <= prompt + 16 + 4 for h in held[3:])  # from the first compression on
    assert cache.decode_steps == 16


def test_lazy_records_every_period_even_before_the_budget_is_reached(models):
    cache, _, _ = run(None, "lazy:budget=500,every=4", steps=8, arch_model=models["llama"])
    view = cache.layers[0].view()
    assert view.scores is not None and bool((view.scores[view.slots >= 0] > 0).all())
    assert cache.tokens_kept() == (PROMPT + 8) * 2 * 2  # nothing evicted: 2 layers x 2 KV heads


@pytest.mark.parametrize("threshold", [0.5, -0.5])
def test_rkv_redundancy_compares_only_the_candidates(threshold):
    """A head's redundancy is the same whether its candidates sit alone or among other tokens (a
    frozen prompt before them, tokens after them): non-candidates, whatever their keys or a
    negative threshold, are no one's copy, and their own redundancy is 0."""
    generator = torch.Generator().manual_seed(0)
    candidate_keys = torch.randn(1, 2, 6, 8, generator=generator)
    alone = key_redundancy(candidate_keys, torch.ones(1, 2, 6, dtype=torch.bool), threshold)
    keys = torch.cat([torch.randn(1, 2, 3, 8), candidate_keys, torch.randn(1, 2, 2, 8)], 2)
    columns = torch.arange(11).expand(1, 2, 11)
    candidates = (columns >= 3) & (columns < 9)
    among_others = key_redundancy(keys, candidates, threshold)
    torch.testing.assert_close(among_others[..., 3:9], alone)
    assert bool((among_others[~candidates] == 0).all())
    assert not torch.allclose(alone, torch.full_like(alone, 1 / 6))  # the keys do set the scores
