"""``ScoringInputs.attention_peak`` / ``attention_mass`` / ``attention`` against the plainest
reference there is: one float64 softmax over every candidate, the mask written out from slots,
validity and query slots, then the max (or sum) over queries. Hand-built layouts cover what a
cache really hands the attention function: heads holding different numbers of tokens after a
compression (ragged heads, right-padded), padding and left-padding columns, entries in storage
order (new tokens written into freed holes), batched rows, queries that are a later chunk (the
causal split moves from one query block to the next), GQA, and a query that sees nothing.

``benchmarks/attention_peak.py`` keeps the former implementation as its "before"; it is checked
here too, the compression step's call included (no queries, the forward's observed statistic),
which the benchmark once got wrong: it scored every token 0 there and so kept other tokens."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from kvsqueeze import CompressedCache, Recipe, install
from kvsqueeze.engine import prefill_context, split_prompt
from kvsqueeze.scorers.base import ScoringInputs, inputs_from_tensors

BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "attention_peak.py"


def benchmark_module():
    spec = importlib.util.spec_from_file_location("attention_peak_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference(inputs: ScoringInputs, start: int = 0) -> torch.Tensor:
    """``[B, Hkv, n_rep, q, L]`` float64 probabilities of queries ``start:``; 0 where masked."""
    batch, kv_heads, _, dim = inputs.keys.shape
    queries = inputs.queries[:, :, start:].double().reshape(batch, kv_heads, inputs.n_rep, -1, dim)
    logits = torch.einsum("bhrqd,bhld->bhrql", queries, inputs.keys.double()) * inputs.scaling
    seen = inputs.slots[:, :, None, :] <= inputs.query_slots[:, None, start:, None]
    seen = seen & inputs.valid[:, :, None, :]
    return logits.masked_fill(~seen[:, :, None], -math.inf).softmax(-1).nan_to_num(0.0)


def held(
    slots: list[list[list[int]]],
    query_slots: list[list[int]],
    n_rep: int = 3,
    invalid: list[tuple[int, int, int]] = (),
    length: int | None = None,
    seed: int = 0,
) -> ScoringInputs:
    """Inputs whose ``(row, head)`` holds ``slots[row][head]`` in that storage order (``-1`` =
    nothing held), right-padded with ``-1`` to ``length``; ``invalid`` lists ``(row, head, slot)``
    entries that are held but hidden (left padding, a mask)."""
    length = length or max(len(head) for row in slots for head in row)
    table = torch.full((len(slots), len(slots[0]), length), -1, dtype=torch.long)
    for b, row in enumerate(slots):
        for h, head in enumerate(row):
            table[b, h, : len(head)] = torch.tensor(head)
    valid = table >= 0
    for b, h, slot in invalid:
        valid[b, h] &= table[b, h] != slot
    batch, kv_heads = table.shape[:2]
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, kv_heads, length, 8, generator=generator)
    queries = 2 * torch.randn(batch, kv_heads * n_rep, len(query_slots[0]), 8, generator=generator)
    query_slots = torch.tensor(query_slots)
    return inputs_from_tensors(
        keys, queries, valid=valid, slots=table, query_slots=query_slots, query_positions=query_slots
    )


def chunk(first: int, count: int) -> list[int]:
    return list(range(first, first + count))


CASES = {
    # three heads kept 6, 9 and 2 of the first 14 tokens; the new chunk 14..21 follows each
    "ragged heads": lambda: held(
        [
            [
                [0, 1, 2, 3, 7, 9, *chunk(14, 8)],
                [0, 1, 5, 6, 8, 10, 11, 12, 13, *chunk(14, 8)],
                [0, 4, *chunk(14, 8)],
            ]
        ],
        [chunk(14, 8)],
    ),
    # left padding (slots 0..2 hidden in every head), ragged tails, 3 padding columns no head uses
    "padding columns": lambda: held(
        [[chunk(0, 12), [*chunk(0, 3), 6, 8, *chunk(9, 3)], chunk(0, 3) + chunk(10, 2)]],
        [chunk(6, 6)],
        invalid=[(0, h, s) for h in range(3) for s in range(3)],
        length=15,
    ),
    # storage order: new tokens written into the holes evicted tokens left, holes in the middle
    "storage order": lambda: held(
        [[[0, 15, 2, 16, -1, 5, 14, 17], [18, 1, -1, 14, 3, 15, 16, 17], [0, -1, -1, 14, 15, 16, 17, 9]]],
        [chunk(14, 4)],
        n_rep=2,
    ),
    # two rows holding different tokens, with their queries at different slots
    "batched rows": lambda: held(
        [[chunk(0, 16), [0, 3, 4, *chunk(10, 6)]], [[1, 2, *chunk(12, 6)], chunk(0, 18)]],
        [chunk(10, 6), chunk(12, 6)],
    ),
    # the queries are a later chunk, candidates newer than every query are held too
    "later chunk": lambda: held(
        [[[0, 2, 5, 11, 17, *chunk(20, 12)], [0, 1, 3, *chunk(20, 12)]]],
        [chunk(20, 6)],
        n_rep=4,
    ),
    # row 0 head 1's first query sees nothing: everything before it is hidden
    "a query that sees nothing": lambda: held(
        [[chunk(0, 10), chunk(0, 10)]],
        [chunk(5, 5)],
        invalid=[(0, 1, s) for s in range(6)],
    ),
    "one query head per KV head": lambda: held(
        [[[0, 1, 7, *chunk(9, 5)], chunk(0, 14)]],
        [chunk(9, 5)],
        n_rep=1,
    ),
}


def random_layout(seed: int) -> ScoringInputs:
    """A random cache state: per row and head a sorted random subset of the older tokens plus the
    chunk, sometimes shuffled into storage order with holes, some entries hidden, ragged lengths."""
    generator = torch.Generator().manual_seed(seed)

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=generator))

    batch, kv_heads, n_rep, queries, older = draw(1, 3), draw(1, 4), draw(1, 4), draw(1, 12), draw(0, 24)
    first = older + draw(0, 4)
    rows = []
    for _ in range(batch):
        heads = []
        for _ in range(kv_heads):
            kept = torch.randperm(first, generator=generator)[: draw(0, older + 1)].sort().values.tolist()
            head = kept + chunk(first, queries) + [-1] * draw(0, 3)
            if draw(0, 3) == 0:
                head = [head[i] for i in torch.randperm(len(head), generator=generator).tolist()]
            heads.append(head)
        rows.append(heads)
    inputs = held(rows, [chunk(first, queries)] * batch, n_rep=n_rep, seed=seed)
    hidden = torch.rand(inputs.valid.shape, generator=generator) < 0.2
    return ScoringInputs(**{**vars(inputs), "valid": inputs.valid & ~hidden, "_probs_cache": {}})


def assert_statistics_match(inputs: ScoringInputs, block: int, last: int | None) -> None:
    start = 0 if last is None else max(inputs.num_queries - last, 0)
    probs = reference(inputs, start)
    close = dict(rtol=1e-5, atol=1e-6)  # float32 against float64
    fresh = ScoringInputs(**{**vars(inputs), "_probs_cache": {}})  # nothing memoised
    torch.testing.assert_close(fresh.attention_peak(last, block).double(), probs.amax(3), **close)
    torch.testing.assert_close(fresh.attention_mass(last, block).double(), probs.sum(3), **close)
    torch.testing.assert_close(fresh.attention(last, block).double(), probs, **close)
    assert not fresh.attention_peak(last, block).isnan().any()


@pytest.mark.parametrize("last", [None, 3])
@pytest.mark.parametrize("block", [1, 3, 256])
@pytest.mark.parametrize("case", list(CASES))
def test_statistics_match_one_softmax_over_every_candidate(case, block, last):
    assert_statistics_match(CASES[case](), block, last)


def test_the_cases_are_what_they_claim():
    ragged = CASES["ragged heads"]()
    assert ragged.valid.sum(-1).tolist() == [[14, 17, 10]] and ragged.n_rep == 3
    assert (CASES["padding columns"]().slots[..., -3:] == -1).all()
    order = CASES["storage order"]().slots
    assert not (order[..., 1:] >= order[..., :-1]).all()
    rows = CASES["batched rows"]()
    assert rows.query_slots[0, 0] != rows.query_slots[1, 0]
    later = CASES["later chunk"]()
    assert (later.slots > later.query_slots.max()).any() and (later.slots < later.query_slots.min()).any()
    assert reference(CASES["a query that sees nothing"]())[0, 1, :, 0].sum() == 0


@pytest.mark.parametrize("seed", range(40))
def test_statistics_match_one_softmax_on_random_cache_states(seed):
    inputs = random_layout(seed)
    for block in (1, 4, 256):
        assert_statistics_match(inputs, block, None)
    assert_statistics_match(inputs, 2, max(inputs.num_queries // 2, 1))


@pytest.mark.parametrize("case", list(CASES))
def test_the_benchmarks_before_is_the_former_statistic(case):
    """The benchmark's ``old_attention_peak`` agrees with the new one on every layout."""
    old = benchmark_module().old_attention_peak
    inputs = CASES[case]()
    for block, last in [(1, None), (256, None), (3, 3)]:
        fresh = ScoringInputs(**{**vars(inputs), "_probs_cache": {}})
        torch.testing.assert_close(
            old(fresh, last, block), fresh.attention_peak(last, block), rtol=1e-5, atol=1e-6
        )


def test_the_compression_step_scores_with_what_the_forward_observed():
    """At compression time a KVzip layer holds no queries: both implementations must return the
    statistic recorded over the forward's queries, not 0 for every candidate."""
    old = benchmark_module().old_attention_peak
    inputs = CASES["ragged heads"]()
    observed = torch.rand(1, 3, 3, inputs.keys.shape[2], generator=torch.Generator().manual_seed(1))
    empty = ScoringInputs(
        **{**vars(inputs), "queries": inputs.queries[:, :, :0], "query_slots": inputs.query_slots[:, :0]}
    )
    assert not empty.attention_peak().any()  # nothing observed, no query: nothing attended
    scored = ScoringInputs(**{**vars(empty), "observed": {"attention_peak": observed}})
    assert scored.attention_peak() is observed
    assert old(scored) is observed
    assert scored.attention_peak(last=2).shape == observed.shape  # ``last`` reads the held queries


CONTEXT = "The museum opens at nine. " * 12 + "The pass key is 4417. " + "Tea is served at four. " * 12


@pytest.fixture(scope="module")
def peaky(tokenizer):
    """A tiny random Llama with large weights, so that its attention is peaked and a global
    budget gives its heads different numbers of tokens (at the default scale they tie)."""
    return tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=4096, initializer_range=0.5)


@pytest.mark.parametrize(
    ("recipe", "statistic"), [("h2o+global@0.75", "attention_mass"), ("kvzip+global@0.75", "attention_peak")]
)
def test_the_forwards_statistics_match_one_softmax_on_ragged_padded_batches(
    peaky, tokenizer, recipe, statistic, monkeypatch
):
    """A chunked prefill of two left-padded rows: after the first chunk, heads hold different
    numbers of tokens, and every statistic the attention function computes still matches."""
    install(peaky)
    context_text, _ = split_prompt(tokenizer, CONTEXT, "What is the pass key?")
    rows = [tokenizer.encode(context_text, add_special_tokens=False)]
    rows.append(rows[0][: len(rows[0]) - 37])
    width = len(rows[0])
    ids = torch.tensor([[0] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    new = getattr(ScoringInputs, statistic)
    ragged = []

    def compared(inputs: ScoringInputs, last: int | None = None, block: int = 256) -> torch.Tensor:
        result = new(inputs, last, block)
        if not inputs.observed:
            probs = reference(inputs, inputs._first_query(last))
            expected = probs.amax(3) if statistic == "attention_peak" else probs.sum(3)
            torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-6)
            held = inputs.valid.sum(-1)
            ragged.append(bool((held != held[:, :1]).any()))
        return result

    monkeypatch.setattr(ScoringInputs, statistic, compared)
    prefill_context(peaky, tokenizer, CompressedCache(Recipe.parse(recipe)), ids, mask, 48)
    assert ragged
    if statistic == "attention_mass":
        assert any(ragged)  # H2O compressed after each chunk: later forwards saw ragged heads
