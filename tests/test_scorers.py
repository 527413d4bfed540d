"""Each scorer keeps what its paper says it keeps, on small hand-built tensors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from tiny_models import random_kvzap_weights

from kvsqueeze.scorers import (
    H2O,
    NEVER_EVICT,
    SCORERS,
    TOVA,
    ChunkKV,
    ExpectedAttention,
    KeyDiff,
    KNorm,
    RandomScorer,
    SnapKV,
    StreamingLLM,
)
from kvsqueeze.scorers.base import ScoringInputs, first_valid, inputs_from_tensors, last_valid, sum_by_slot
from kvsqueeze.scorers.expected import mean_rope_rotation, rope_unrotate
from kvsqueeze.selection import keep_mask

D = 8
INV_FREQ = 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def make_inputs(batch=1, kv_heads=2, n_rep=2, length=16, q=4, seed=0, keys=None, queries=None, **kw):
    keys = randn(batch, kv_heads, length, D, seed=seed) if keys is None else keys
    if queries is None:
        queries = randn(batch, kv_heads * n_rep, q, D, seed=seed + 1)
    values = kw.pop("values", randn(batch, kv_heads, length, D, seed=seed + 2))
    kw.setdefault("rope_inv_freq", INV_FREQ)
    return inputs_from_tensors(keys, queries, values, **kw)


def kept(scorer, inputs, budget: int) -> list[list[set[int]]]:
    """Slots kept per [batch][head] under a per-head budget, via the cache's entry point ``rank``."""
    counts = torch.full(inputs.keys.shape[:2], budget)
    inputs.budget = counts
    ranking, _ = scorer.rank(inputs)
    mask = keep_mask(ranking, inputs.valid, counts)
    return [
        [set(inputs.slots[b, h][mask[b, h]].tolist()) for h in range(mask.shape[1])]
        for b in range(mask.shape[0])
    ]


def group_softmax(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Reference: softmax of ``queries`` ``[Hq, D]`` over ``keys`` ``[Hkv, L, D]``, mean per group."""
    logits = torch.einsum("hd,hld->hl", queries, keys.repeat_interleave(2, 0)) * D**-0.5
    return torch.softmax(logits, -1).reshape(keys.shape[0], 2, -1).mean(1)


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Reference HF RoPE of ``x`` ``[B, H, q, D]`` at ``positions`` ``[B, q]``, written as complex
    multiplication: dims ``(i, i + D/2)`` form the number turned by ``positions * inv_freq[i]``."""
    half = x.shape[-1] // 2
    turned = torch.complex(x[..., :half], x[..., half:]) * torch.polar(
        torch.ones(()), positions.float()[:, None, :, None] * INV_FREQ
    )
    return torch.cat((turned.real, turned.imag), dim=-1)


# --- registry and contract shared by every scorer -------------------------------------------


def test_registry_order_and_metadata():
    assert list(SCORERS) == [
        "random", "streaming", "knorm", "h2o", "tova", "snapkv", "expected", "keydiff", "chunkkv", "kvzip",
        "kvzap",
    ]  # fmt: skip
    for name, cls in SCORERS.items():
        assert cls.name == name and cls.__doc__ and dataclasses.is_dataclass(cls)
        assert name == "random" or "arXiv:" in cls.citation
    assert ChunkKV.citation.endswith("2502.00299") and ExpectedAttention.citation.endswith("2510.00636")


def contract_inputs(garbage: float) -> ScoringInputs:
    """B=2 with left padding in batch 0, a dropped token and ragged padding in batch 1."""
    length = 16
    valid = torch.ones(2, 2, length, dtype=torch.bool)
    valid[0, :, :3] = False
    valid[1, 0, 7] = False
    valid[1, 1, -2:] = False
    slots = torch.arange(length).repeat(2, 2, 1)
    slots[1, 1, -2:] = -1
    keys, values = randn(2, 2, length, D), randn(2, 2, length, D, seed=2)
    previous = randn(2, 2, length, seed=3).abs()
    for tensor in (keys, values):
        tensor[~valid] = garbage
    previous[~valid] = garbage
    positions = torch.stack([torch.arange(7, 13), torch.arange(10, 16)])
    return make_inputs(
        batch=2, q=6, keys=keys, values=values, valid=valid, slots=slots,
        query_positions=positions, previous_scores=previous,
    )  # fmt: skip


@pytest.mark.parametrize("name", list(SCORERS))
def test_contract_shape_finite_and_blind_to_invalid(name, tmp_path):
    options = {"weights": random_kvzap_weights(tmp_path)} if name == "kvzap" else {}
    scorer = SCORERS[name](**options)
    clean = contract_inputs(0.0)
    ranking, state = scorer.rank(clean)
    valid = clean.valid
    assert ranking.shape == valid.shape == (2, 2, 16)
    assert (torch.isfinite(ranking) | (ranking == NEVER_EVICT))[valid].all()
    assert (state is not None) == scorer.stateful
    for garbage in (1e4, math.nan):
        dirty, _ = scorer.rank(contract_inputs(garbage))
        torch.testing.assert_close(dirty[valid], ranking[valid])


def test_attention_mass_matches_blocked_attention():
    inputs = make_inputs(q=7, valid=torch.rand(1, 2, 16, generator=torch.Generator().manual_seed(4)) > 0.3)
    mass = inputs.attention_mass(block=2)
    torch.testing.assert_close(mass, inputs.attention(block=3).sum(3))
    torch.testing.assert_close(inputs.attention_mass(last=3), inputs.attention(last=3).sum(3))


def test_valid_helpers():
    valid = torch.tensor([[[False, True, True, False, True, True]]])
    assert first_valid(valid, 2).tolist() == [[[False, True, True, False, False, False]]]
    assert last_valid(valid, 3).tolist() == [[[False, False, True, False, True, True]]]
    slots = torch.tensor([[[0, 1, 2, 3, 4, 5], [0, 2, 3, 5, -1, -1]]])
    valid = slots >= 0
    totals = sum_by_slot(torch.ones(1, 2, 6), slots, valid, group=2)
    assert totals[valid].tolist() == [3, 3, 4, 4, 3, 3, 3, 4, 4, 3]


# --- one test group per paper ---------------------------------------------------------------


def test_random_is_seeded_per_layer():
    inputs = make_inputs()
    first = RandomScorer(seed=3).score(inputs)
    assert torch.equal(first, RandomScorer(seed=3).score(make_inputs()))
    assert not torch.equal(first, RandomScorer(seed=3).score(make_inputs(layer_idx=1)))
    assert not torch.equal(first, RandomScorer(seed=4).score(inputs))


def test_streaming_keeps_sinks_and_recent_window():
    assert kept(StreamingLLM(), make_inputs(), 8)[0] == [{0, 1, 2, 3, 12, 13, 14, 15}] * 2
    valid = torch.ones(1, 2, 16, dtype=torch.bool)
    valid[..., :3] = False  # left padding: the sinks are the first real tokens
    assert kept(StreamingLLM(sinks=2), make_inputs(valid=valid), 5)[0] == [{3, 4, 13, 14, 15}] * 2


def test_knorm_keeps_lowest_norm_keys():
    keys = randn(1, 2, 16, D)
    keys[0, 0, [2, 9, 13]] *= 0.01
    keys[0, 1, [0, 5]] *= 0.01
    keys[0, 1, 7] *= 0.02
    assert kept(KNorm(), make_inputs(keys=keys), 3)[0] == [{2, 9, 13}, {0, 5, 7}]


def test_keydiff_keeps_outlier_direction():
    keys = torch.zeros(1, 2, 16, D)
    keys[..., 0] = 1.0
    keys += 0.05 * randn(1, 2, 16, D)
    keys[0, 0, 4] *= 100.0  # a huge-norm key along the common direction is still redundant
    keys[0, 0, 5] = torch.eye(D)[1]
    keys[0, 1, 11] = -torch.eye(D)[3] + 0.5 * torch.eye(D)[0]
    assert kept(KeyDiff(), make_inputs(keys=keys), 1)[0] == [{5}, {11}]


def heavy_hitter_inputs(**kw):
    """Slot 1 is what every query (slots 8..15) looks at."""
    keys = 0.1 * randn(1, 2, 16, D)
    keys[..., 1, 0] = 5.0
    queries = 0.1 * randn(1, 4, 8, D, seed=1)
    queries[..., 0] += 5.0
    return make_inputs(keys=keys, queries=queries, **kw)


def test_h2o_keeps_heavy_hitter_and_accumulates():
    inputs = heavy_hitter_inputs()
    assert kept(H2O(recent_share=0), inputs, 1)[0] == [{1}, {1}]
    state = H2O().score(inputs)
    torch.testing.assert_close(state.sum(-1), torch.full((1, 2), 8.0))  # each query spreads 1
    previous = torch.zeros(1, 2, 16)
    previous[..., 6] = 100.0
    accumulated = H2O().score(heavy_hitter_inputs(previous_scores=previous))
    torch.testing.assert_close(accumulated, state + previous)
    assert kept(H2O(recent_share=0), heavy_hitter_inputs(previous_scores=previous), 2)[0] == [{1, 6}] * 2


def test_h2o_protects_recent_without_touching_state():
    inputs = heavy_hitter_inputs(budget=torch.full((1, 2), 4))
    ranking, state = H2O(recent_share=0.5).rank(inputs)
    assert torch.isfinite(state).all() and torch.equal(state, H2O().score(inputs))
    assert (ranking[..., 14:] == NEVER_EVICT).all() and torch.isfinite(ranking[..., :14]).all()
    assert kept(H2O(recent_share=2 / 3), inputs, 3)[0] == [{1, 14, 15}] * 2


def test_tova_uses_only_last_query_shared_across_heads():
    inputs = make_inputs(q=4)
    scores = TOVA().score(inputs)
    expected = inputs.attention(last=1)[:, :, :, 0].mean((1, 2))
    torch.testing.assert_close(scores, expected[:, None].expand(-1, 2, -1))
    queries = inputs.queries.clone()
    queries[:, :, :-1] = randn(1, 4, 3, D, seed=9)
    torch.testing.assert_close(TOVA().score(make_inputs(queries=queries)), scores)
    queries[:, :, -1] = randn(1, 4, D, seed=10)
    assert not torch.allclose(TOVA().score(make_inputs(queries=queries)), scores)


def test_tova_matches_heads_by_slot_after_per_head_eviction():
    slots = torch.arange(16).repeat(1, 2, 1)
    slots[0, 1] = torch.tensor([0, 1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, -1, -1])
    scores = TOVA().score(make_inputs(slots=slots, valid=slots >= 0))
    for index, slot in enumerate(slots[0, 1, :14].tolist()):
        assert scores[0, 1, index] == scores[0, 0, slot]


def snap_inputs():
    """Window queries (slots 12..15) look at slot 5 and, more, at the window keys themselves;
    the earlier queries (slots 8..11) look hard at slot 2 instead."""
    keys = 0.1 * randn(1, 2, 16, D)
    keys[..., 5, 0] = 3.0
    keys[..., 12:, 0] = 4.0
    keys[..., 2, 1] = 6.0
    queries = 0.1 * randn(1, 4, 8, D, seed=1)
    queries[..., 4:, 0] += 3.0
    queries[..., :4, 1] += 6.0
    return make_inputs(keys=keys, queries=queries)


def test_snapkv_keeps_attended_token_and_window():
    inputs = make_inputs(q=8)
    votes = inputs.attention(last=4).sum(3).mean(2)
    torch.testing.assert_close(SnapKV(window=4, kernel_size=1).score(inputs)[..., :12], votes[..., :12])
    assert kept(SnapKV(window=4, kernel_size=1), snap_inputs(), 5)[0] == [{5, 12, 13, 14, 15}] * 2
    keys = snap_inputs().keys.clone()
    keys[..., 12:, 0] = -4.0  # ignored window tokens are still kept
    inputs = make_inputs(keys=keys, queries=snap_inputs().queries)
    assert kept(SnapKV(window=4, kernel_size=1), inputs, 5)[0] == [{5, 12, 13, 14, 15}] * 2


def test_snapkv_pooling_keeps_neighbours_but_not_from_window():
    # without excluding the window from pooling, slot 11 would inherit the window's attention
    assert kept(SnapKV(window=4, kernel_size=3), snap_inputs(), 7)[0] == [{4, 5, 6, 12, 13, 14, 15}] * 2


def test_expected_attention_reduces_to_softmax_times_value_norm():
    q0 = randn(1, 4, 1, D, seed=5)
    inputs = make_inputs(queries=q0.expand(-1, -1, 4, -1), rope_inv_freq=torch.zeros(D // 2))
    scorer = ExpectedAttention(window=4, future=1, sinks=0, use_covariance=False)
    reference = group_softmax(q0[0, :, 0], inputs.keys[0]) * inputs.values[0].norm(dim=-1)
    torch.testing.assert_close(scorer.score(inputs)[0], reference)
    sunk = ExpectedAttention(window=4, future=1, sinks=2, use_covariance=False).score(inputs)
    assert (sunk[..., :2] == NEVER_EVICT).all()
    reference = group_softmax(q0[0, :, 0], inputs.keys[0, :, 2:]) * inputs.values[0, :, 2:].norm(dim=-1)
    torch.testing.assert_close(sunk[0, :, 2:], reference)


def test_rope_unrotate_recovers_constant_query():
    q0 = randn(2, 4, 1, D, seed=6)
    positions = torch.stack([torch.arange(3, 11), torch.arange(100, 108)])
    rotated = rope(q0.expand(-1, -1, 8, -1), positions)
    torch.testing.assert_close(rope_unrotate(rotated, positions[:, None], INV_FREQ), q0.expand(-1, -1, 8, -1))


def test_mean_rope_rotation_is_average_of_rotations():
    first = torch.tensor([0, 37])
    eye = torch.eye(D).expand(2, 1, D, D)  # columns of the identity, rotated = rotation matrix
    matrices = [rope(eye, (first + p)[:, None].expand(-1, D)).transpose(-1, -2) for p in range(5)]
    torch.testing.assert_close(mean_rope_rotation(first, 5, INV_FREQ), torch.stack(matrices).mean(0)[:, 0])


def test_expected_attention_averages_future_rotations():
    q0 = 2.0 * randn(1, 4, 1, D, seed=7)
    positions = torch.arange(12, 16)[None]
    inputs = make_inputs(queries=rope(q0.expand(-1, -1, 4, -1), positions))
    future = [rope(q0, torch.tensor([[16 + p]])) for p in range(6)]
    mean_query = torch.stack(future).mean(0)[0, :, 0]
    reference = group_softmax(mean_query, inputs.keys[0, :, 4:]) * inputs.values[0, :, 4:].norm(dim=-1)
    scores = ExpectedAttention(window=4, future=6).score(inputs)
    torch.testing.assert_close(scores[0, :, 4:], reference, atol=1e-5, rtol=1e-4)


def test_expected_attention_matches_gaussian_reference():
    samples = randn(1, 4, 6, D, seed=12) + randn(1, 4, 1, D, seed=13)  # pre-RoPE queries
    positions = torch.arange(10, 16)[None]
    inputs = make_inputs(queries=rope(samples, positions))
    eye = torch.eye(D).expand(1, 1, D, D)
    rotation = torch.stack([rope(eye, torch.full((1, D), 16 + p)).mT for p in range(5)]).mean(0)[0, 0]
    mu = samples[0].mean(1)
    centred = samples[0] - mu[:, None]
    cov = rotation @ (centred.mT @ centred / 6) @ rotation.T
    keys = inputs.keys[0].repeat_interleave(2, 0)
    logits = keys @ (rotation @ mu[..., None]) * D**-0.5
    logits = logits[..., 0] + 0.5 / D * torch.einsum("hld,hde,hle->hl", keys, cov, keys)
    probs = torch.softmax(logits, -1).reshape(2, 2, -1).mean(1)
    reference = (probs + 0.1) * inputs.values[0].norm(dim=-1)
    scores = ExpectedAttention(window=6, future=5, sinks=0, epsilon=0.1).score(inputs)
    torch.testing.assert_close(scores[0], reference, atol=1e-5, rtol=1e-4)


def test_expected_attention_covariance_favours_high_variance_direction():
    queries = torch.zeros(1, 4, 8, D)
    queries[..., 1] = 3.0 * torch.tensor([1.0, -1.0]).repeat(4)  # zero mean, large variance on dim 1
    keys = 0.01 * randn(1, 2, 16, D)
    keys[..., 6, 1] = 2.0
    keys[..., 9, 2] = 2.0
    values = torch.ones(1, 2, 16, D)
    inputs = make_inputs(keys=keys, queries=queries, values=values, rope_inv_freq=torch.zeros(D // 2))
    with_cov = ExpectedAttention(window=8, sinks=0).score(inputs)
    assert (with_cov[..., 6] > 2 * with_cov[..., 9]).all()
    without = ExpectedAttention(window=8, sinks=0, use_covariance=False).score(inputs)
    torch.testing.assert_close(without[..., 6], without[..., 9])


def test_expected_attention_ignores_left_padding_queries_and_needs_rope():
    valid = torch.ones(1, 2, 16, dtype=torch.bool)
    valid[..., :3] = False
    queries = randn(1, 4, 16, D, seed=8)
    base = ExpectedAttention(window=16).score(make_inputs(queries=queries, valid=valid))
    queries[:, :, :3] = 1e3
    torch.testing.assert_close(
        ExpectedAttention(window=16).score(make_inputs(queries=queries, valid=valid)), base
    )
    with pytest.raises(ValueError, match="rope_inv_freq"):
        ExpectedAttention().score(make_inputs(rope_inv_freq=None))


def chunk_inputs(slots: torch.Tensor, hot: int, batch: int = 1):
    """Slots given per candidate; queries are the last 4; head 0 only looks hard at slot ``hot``."""
    keys = 0.3 * randn(batch, 2, 16, D)
    keys[:, 0, (slots[0] == hot).nonzero()[0, 0], 0] = 4.0
    queries = 0.1 * randn(batch, 4, 4, D, seed=1)
    queries[..., 0] += 3.0
    query_slots = slots[:, -4:].expand(batch, -1)
    return make_inputs(
        batch=batch, keys=keys, queries=queries, slots=slots.expand(batch, 2, -1),
        query_slots=query_slots, query_positions=query_slots.clone(),
    )  # fmt: skip


def test_chunkkv_keeps_whole_chunks_same_in_every_head():
    slots = torch.arange(16)[None]
    result = kept(ChunkKV(chunk_size=4, window=4), chunk_inputs(slots, hot=6, batch=2), 8)
    assert result == [[set(range(4, 8)) | set(range(12, 16))] * 2] * 2
    for budget in (4, 8, 12, 16):
        for heads in kept(ChunkKV(chunk_size=4, window=4), make_inputs(batch=2, seed=11), budget):
            assert heads[0] == heads[1]
            assert all({4 * (s // 4) + i for i in range(4)} <= heads[0] for s in heads[0])


def test_chunkkv_chunk_score_is_mean_vote_over_heads():
    valid = torch.ones(1, 2, 16, dtype=torch.bool)
    valid[..., :3] = False  # chunk 0 holds a single real token: a sum would sink it
    inputs = make_inputs(q=6, valid=valid, seed=14)
    votes = inputs.attention(last=3).sum(3).mean(2)[0]
    scores = ChunkKV(chunk_size=4, window=3).score(inputs)[0]
    for chunk in range(4):  # chunk 3 is slot 12 plus the window (13..15), which does not count
        members = [slot for slot in range(4 * chunk, min(4 * chunk + 4, 13)) if valid[0, 0, slot]]
        assert torch.allclose(scores[:, members], votes[:, members].mean())


def test_chunkkv_scores_chunks_without_window_tokens():
    inputs = chunk_inputs(torch.arange(16)[None], hot=6)
    inputs.keys[..., 13:, 0] = 5.0  # the window (13..15) attends to itself; chunk 3 is {12} + window
    assert kept(ChunkKV(chunk_size=4, window=3), inputs, 7)[0] == [{4, 5, 6, 7, 13, 14, 15}] * 2


def test_chunkkv_chunks_follow_slots_after_eviction():
    slots = torch.tensor([[0, 1, 2, 5, 6, 7, 9, 10, 11, 12, 13, 14, 16, 17, 18, 19]])
    assert (
        kept(ChunkKV(chunk_size=4, window=4), chunk_inputs(slots, hot=10), 7)[0]
        == [{9, 10, 11, 16, 17, 18, 19}] * 2
    )
