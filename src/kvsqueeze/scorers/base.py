"""What a scorer sees, and the interface every scorer implements.

A scorer is a pure function of tensors: given the candidate keys/values of one layer (the tokens
already stored plus the chunk just prefilled) and the queries of that chunk, it returns one
importance score per (batch, KV head, candidate). Higher means "keep". The cache turns scores into
a keep set (top-k per head under the budget); scorers never touch storage.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from kvsqueeze.components import Component

NEVER_EVICT = float("inf")
"""Score a scorer gives to tokens it insists on keeping (e.g. StreamingLLM sinks)."""


@dataclass
class ScoringInputs:
    """Everything a scorer may use for one layer during one compression step.

    Shapes: ``B`` batch, ``Hkv`` key/value heads, ``Hq`` query heads (``Hq = Hkv * n_rep``),
    ``L`` candidates per head (ragged heads are right-padded to ``L``), ``q`` queries in the chunk,
    ``D`` head dim.

    Attributes
    ----------
    keys, values : ``[B, Hkv, L, D]`` post-RoPE keys and values of the candidates.
    slots : ``[B, Hkv, L]`` int64 index of each candidate in the full sequence (0 = first token fed
        to the cache, padding included); ``-1`` where the ragged view is padded. Candidates are
        sorted by slot within each head.
    valid : ``[B, Hkv, L]`` bool; False for ragged padding, left-padding tokens and tokens no query
        can see any more. Invalid candidates are always dropped first, whatever their score.
    queries : ``[B, Hq, q, D]`` post-RoPE queries of the chunk just prefilled.
    query_positions : ``[B, q]`` RoPE position of each query (left padding shifts these).
    query_slots : ``[B, q]`` slot of each query; query ``i`` sees valid candidates with
        ``slot <= query_slots[:, i]`` (see ``query_mask``).
    scaling : softmax scale of the attention (usually ``D ** -0.5``).
    layer_idx, num_layers : position of this layer in the model.
    rope_inv_freq : ``[D // 2]`` RoPE inverse frequencies, for scorers that need to undo or
        extrapolate rotations (ExpectedAttention).
    previous_scores : ``[B, Hkv, L]`` running score kept by a stateful scorer (0 for new tokens),
        or None for stateless scorers.
    budget : ``[B, Hkv]`` tokens each head will keep (set by the recipe before scoring), for
        scorers that split their budget (H2O's heavy hitters vs recent window); None if unknown.
    protected : ``[B, Hkv, L]`` bool of candidates kept whatever their score and not counted in the
        budget (the question in query-aware mode; set by the recipe), or None.
    context_tokens : ``[B]`` context tokens seen so far per row, the base of the budget (set by
        the recipe), or None.
    config : the model's ``PreTrainedConfig``, for budgets that depend on the model's identity
        (DuoAttention's head profile); None for hand-built inputs.
    units : ``[B, Hkv, L]`` unit of each candidate (the slot of its unit's first token; see
        ``kvsqueeze.units``), or None when the cache was given none.
    observed : statistics over *every* query of the compressed forward, recorded by the attention
        function while it ran (``queries`` only holds the last few): ``attention_mass`` /
        ``attention_peak`` ``[B, Hkv, n_rep, L]``, for the scorers that declare them in
        ``Scorer.statistics``. ``attention_mass()`` and ``attention_peak()`` without ``last``
        return them.
    """

    keys: torch.Tensor
    values: torch.Tensor
    slots: torch.Tensor
    valid: torch.Tensor
    queries: torch.Tensor
    query_positions: torch.Tensor
    query_slots: torch.Tensor
    scaling: float
    layer_idx: int = 0
    num_layers: int = 1
    rope_inv_freq: torch.Tensor | None = None
    previous_scores: torch.Tensor | None = None
    budget: torch.Tensor | None = None
    protected: torch.Tensor | None = None
    context_tokens: torch.Tensor | None = None
    config: Any = None
    units: torch.Tensor | None = None
    observed: dict[str, torch.Tensor] = field(default_factory=dict)
    _probs_cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.queries.shape[1] // self.keys.shape[1]

    @property
    def num_queries(self) -> int:
        return self.queries.shape[2]

    def query_mask(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """``[B, Hkv, stop - start, L]`` bool: query ``start + i`` may attend to candidate ``j``."""
        causal = self.slots[:, :, None, :] <= self.query_slots[:, None, start:stop, None]
        return causal & self.valid[:, :, None, :]

    def attention(self, last: int | None = None, block: int = 256) -> torch.Tensor:
        """Softmax attention of the last ``last`` queries (all if None) over the candidates.

        Returns ``[B, Hkv, n_rep, w, L]`` probabilities in float32 (query head ``h`` is
        ``[:, h // n_rep, h % n_rep]``); masked entries are 0. Computed in query blocks of
        ``block`` so memory stays ``O(block * L)`` per head, and memoised per ``last``.
        """
        start = self._first_query(last)
        if start not in self._probs_cache:
            length = self.keys.shape[2]
            blocks = [
                torch.nn.functional.pad(log_probs.exp(), (0, length - log_probs.shape[-1]))
                for log_probs in self._log_attention_blocks(start, block)
            ]
            self._probs_cache[start] = torch.cat(blocks, dim=3)
        return self._probs_cache[start]

    def attention_mass(self, last: int | None = None, block: int = 256) -> torch.Tensor:
        """``[B, Hkv, n_rep, L]`` attention each candidate receives, summed over the last ``last``
        queries (all if None).

        Same numbers as ``attention(last).sum(3)``, but the ``[w, L]`` matrix is never kept whole,
        so scoring a long prefill chunk (H2O) costs ``O(block * L)`` memory instead of ``O(q * L)``.
        """
        if last is None and "attention_mass" in self.observed:
            return self.observed["attention_mass"]
        start = self._first_query(last)
        if start in self._probs_cache:
            return self._probs_cache[start].sum(3)
        total = self.keys.new_zeros(*self._statistic_shape(), dtype=torch.float32)
        for log_probs in self._log_attention_blocks(start, block):
            total[..., : log_probs.shape[-1]] += log_probs.exp().sum(3)
        return total

    def attention_peak(self, last: int | None = None, block: int = 256) -> torch.Tensor:
        """``[B, Hkv, n_rep, L]`` largest attention each candidate receives from any of the last
        ``last`` queries (all if None): ``attention(last).amax(3)`` in ``O(block * L)`` memory.

        The max is taken over log-probabilities and exponentiated once per candidate.
        """
        if last is None and "attention_peak" in self.observed:
            return self.observed["attention_peak"]
        start = self._first_query(last)
        if start in self._probs_cache:
            return self._probs_cache[start].amax(3)
        peak = self.keys.new_full(self._statistic_shape(), -math.inf, dtype=torch.float32)
        for log_probs in self._log_attention_blocks(start, block):
            width = log_probs.shape[-1]
            peak[..., :width] = torch.maximum(peak[..., :width], log_probs.amax(3))
        return peak.exp()

    def _statistic_shape(self) -> tuple[int, int, int, int]:
        batch, kv_heads, length, _ = self.keys.shape
        return batch, kv_heads, self.n_rep, length

    def _first_query(self, last: int | None) -> int:
        return 0 if last is None else max(self.num_queries - last, 0)

    def _log_attention_blocks(self, start: int, block: int) -> Iterator[torch.Tensor]:
        """Log-softmax attention of query blocks, ``[B, Hkv, n_rep, block, width]`` float32 with
        ``-inf`` where masked; columns from ``width`` on are seen by no query of the block."""
        batch, kv_heads, _, dim = self.keys.shape
        keys = self.keys.float()
        queries = self.queries[:, :, start:].float() * self.scaling
        queries = queries.reshape(batch, kv_heads, self.n_rep, -1, dim)
        hidden = ~self.valid[:, :, None, None]
        for lo in range(0, queries.shape[3], block):
            query_slots = self.query_slots[:, start + lo : start + lo + block]
            shared, width = visible_columns(self.slots, query_slots)
            logits = torch.einsum("bhrqd,bhld->bhrql", queries[:, :, :, lo : lo + block], keys[:, :, :width])
            # columns older than every query of the block: validity alone masks them, one row for all
            logits[..., :shared].masked_fill_(hidden[..., :shared], -math.inf)
            causal = self.slots[:, :, None, shared:width] <= query_slots[:, None, :, None]
            seen = causal & self.valid[:, :, None, shared:width]
            logits[..., shared:].masked_fill_(~seen[:, :, None], -math.inf)
            yield logits.sub_(log_normaliser(logits))


def visible_columns(slots: torch.Tensor, query_slots: torch.Tensor) -> tuple[int, int]:
    """How the candidate columns split for a block of queries, ``slots [B, H, L]`` and
    ``query_slots [B, w]``: ``(shared, width)`` such that in every head, columns before ``shared``
    hold tokens older than every query (each query sees them if valid) and columns from ``width``
    on hold padding or tokens newer than every query (no query sees them)."""
    first = query_slots.amin(1)[:, None, None]
    last = query_slots.amax(1)[:, None, None]
    older = ((slots >= 0) & (slots < first)).flatten(0, 1).all(0)
    unseen = ((slots < 0) | (slots > last)).flatten(0, 1).all(0)
    shared = int(older.long().cumprod(0).sum())
    width = slots.shape[-1] - int(unseen.flip(0).long().cumprod(0).sum())
    return shared, width


def log_normaliser(logits: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the last axis, keeping it; ``+inf`` for rows with nothing visible, so
    that their log-probabilities are ``-inf`` (probability 0) rather than NaN."""
    normaliser = torch.logsumexp(logits, dim=-1, keepdim=True)
    return normaliser.masked_fill_(normaliser == -math.inf, math.inf)


class Scorer(Component):
    """Base class: ``score`` maps inputs to ``[B, Hkv, L]`` importance (higher = keep).

    Stateless scorers put ``NEVER_EVICT`` straight into ``score`` for tokens they insist on
    keeping. ``stateful`` scorers (H2O) must not: their ``score`` is a running state that the cache
    hands back as ``previous_scores`` at the next compression step (0 for tokens new since then),
    so an ``inf`` in it would stick forever. They declare forced keeps in ``protect`` instead.

    The cache should call ``rank`` (not ``score``) once per layer and step::

        ranking, state = scorer.rank(inputs)
        keep = keep_mask(ranking, inputs.valid, counts)
        if state is not None:  # stateful scorer: store state[keep] per kept token
            ...

    ``needs_attention`` marks scorers that compute attention probabilities (an extra pass).
    ``reconstructs`` marks scorers that score on the engine's context-reconstruction pass
    (KVzip) instead of on the context's own prefill; such a scorer has a ``chunk`` option, the
    copy tokens reconstructed per forward (``kvsqueeze.prefill.ReconstructionPrefill``). What a
    scorer reads of the compressed forward's queries is declared: ``observed_queries()`` (how
    many of the last queries the attention function keeps) and ``statistics`` (``ScoringInputs``
    statistics computed over every query while the forward runs, e.g. ``"attention_mass"``).
    """

    kind = "scorer"
    stateful: bool = False
    needs_attention: bool = False
    reconstructs: bool = False
    statistics: tuple[str, ...] = ()

    def observed_queries(self) -> int:
        """How many of the compressed forward's last queries ``score`` reads (0 = none)."""
        return 0

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        raise NotImplementedError

    def protect(self, inputs: ScoringInputs) -> torch.Tensor | None:
        """``[B, Hkv, L]`` bool of candidates to keep whatever their score, or None (default).

        Applied by ``rank`` on top of ``score``, never stored in the state.
        """
        return None

    def rank(self, inputs: ScoringInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores to select with, and the state to store: what the cache calls.

        Returns ``(ranking, state)``: ``ranking`` ``[B, Hkv, L]`` is ``score`` with ``protect``
        applied as ``NEVER_EVICT`` and feeds ``keep_mask``; ``state`` is the raw ``score`` to store
        for the kept tokens if the scorer is ``stateful``, else None.
        """
        scores = self.score(inputs)
        protected = self.protect(inputs)
        ranking = scores if protected is None else scores.masked_fill(protected, NEVER_EVICT)
        return ranking, scores if self.stateful else None


def first_valid(valid: torch.Tensor, count: int) -> torch.Tensor:
    """``[B, H, L]`` bool: the first ``count`` valid candidates of each head (by slot order)."""
    return valid & (valid.cumsum(-1) <= count)


def last_valid(valid: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    """``[B, H, L]`` bool: the last ``count`` valid candidates of each head (the most recent).

    ``count`` is one number, or ``[B, H]`` numbers, one per head.
    """
    count = count[..., None] if isinstance(count, torch.Tensor) else count
    return valid & (valid.flip(-1).cumsum(-1).flip(-1) <= count)


def sum_by_slot(
    scores: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor, group: int = 1
) -> torch.Tensor:
    """Give each candidate the sum of ``scores`` over all valid candidates, in every head of its
    batch row, whose ``slot // group`` equals its own.

    With ``group=1`` this adds up one token's score across heads (matched by slot, since heads
    that evicted differently hold different tokens at the same index); with ``group=n`` it totals
    chunks of ``n`` consecutive slots. ``[B, H, L]`` in and out; invalid entries contribute 0.
    """
    batch = scores.shape[0]
    ids = (torch.where(valid, slots, 0) // group).reshape(batch, -1)
    totals = scores.new_zeros(batch, int(ids.max()) + 1 if ids.numel() else 1)
    totals.scatter_add_(1, ids, torch.where(valid, scores, 0.0).reshape(batch, -1))
    return totals.gather(1, ids).reshape(scores.shape)


def pool_over_neighbours(scores: torch.Tensor, kernel_size: int, valid: torch.Tensor) -> torch.Tensor:
    """Max-pool ``[B, H, L]`` scores over ``kernel_size`` neighbouring candidates (odd size, 'same')."""
    if kernel_size <= 1:
        return scores
    batch, heads, length = scores.shape
    filled = scores.masked_fill(~valid, 0.0).reshape(batch * heads, 1, length)
    pooled = torch.nn.functional.max_pool1d(filled, kernel_size, stride=1, padding=kernel_size // 2)
    return pooled.reshape(batch, heads, length)


def inputs_from_tensors(
    keys: torch.Tensor,
    queries: torch.Tensor,
    values: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    **overrides,
) -> ScoringInputs:
    """Build ``ScoringInputs`` for hand-made tensors (tests, notebooks).

    Candidates get slots ``0..L-1`` and the ``q`` queries are the last ``q`` candidates (the chunk
    just prefilled), at RoPE positions equal to their slots.
    """
    batch, kv_heads, length, dim = keys.shape
    q_len = queries.shape[2]
    slots = torch.arange(length).expand(batch, kv_heads, length)
    query_slots = torch.arange(length - q_len, length).expand(batch, q_len)
    fields = dict(
        keys=keys,
        values=keys if values is None else values,
        slots=slots,
        valid=torch.ones(batch, kv_heads, length, dtype=torch.bool) if valid is None else valid,
        queries=queries,
        query_positions=query_slots.clone(),
        query_slots=query_slots,
        scaling=dim**-0.5,
    )
    fields.update(overrides)
    return ScoringInputs(**fields)
