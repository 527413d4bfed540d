"""AdaKV: one top-k over the scores of all heads of a layer, so heads keep different amounts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvsqueeze.budgets.base import Budget, protected_counts
from kvsqueeze.components import option
from kvsqueeze.scorers.base import ScoringInputs
from kvsqueeze.selection import keep_mask


def comparable(ranking: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Scores that can be compared across heads, ``[B, Hkv, L]``.

    Attention-derived scores (SnapKV, TOVA, H2O, Expected Attention, ChunkKV) are non-negative
    softmax masses, comparable across heads as they are: each head's attention sums to one per
    query, which is what AdaKV relies on. Signed scores (KNorm's negative norms, KeyDiff's negative
    similarities) are not; in a row that has any, each head's finite scores are shifted to start
    at 0 and divided by their sum, so every head spreads the same total. ``inf`` stays ``inf``.
    """
    finite = candidates & torch.isfinite(ranking)
    values = ranking.float().masked_fill(~finite, 0.0)
    signed = (values < 0).flatten(1).any(-1)  # [B]
    if not bool(signed.any()):
        return ranking.float()
    low = values.masked_fill(~finite, math.inf).amin(-1, keepdim=True)
    shifted = (values - low).masked_fill(~finite, 0.0)
    normalised = shifted / shifted.sum(-1, keepdim=True).clamp(min=1e-12)
    normalised = torch.where(finite, normalised, ranking.float())
    return torch.where(signed[:, None, None], normalised, ranking.float())


@dataclass
class AdaKV(Budget):
    """Share a layer's budget among its KV heads by one top-k over all heads' scores.

    Per batch row, the layer keeps as many tokens as the uniform budget would (the sum of the
    uniform per-head counts), but chooses them by a single top-k over the scores of every head
    flattened together, so a head whose attention is spread thin keeps more tokens and a head
    that looks at a few tokens keeps fewer. Safeguard: each head first keeps its ``alpha *
    uniform`` best tokens. Scores are compared across heads as they are when they are attention
    masses (as in the paper, Ada-SnapKV), per-head normalised otherwise (see ``comparable``).
    Protected tokens are kept on top. Returns ragged per-head counts ``[B, Hkv]``; the scorer's
    ranking is unchanged, so each head keeps its own best tokens.

    Parameters
    ----------
    alpha : safeguard, the fraction of the uniform per-head budget every head keeps at least.
    """

    name = "adakv"
    citation = (
        "Feng et al., 2024. Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for "
        "Efficient LLM Inference. arXiv:2407.11550"
    )

    alpha: float = option(0.2, minimum=0, maximum=1)

    def allocate(
        self, ranking: torch.Tensor, inputs: ScoringInputs, counts: torch.Tensor, state: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, length = ranking.shape
        protected = protected_counts(inputs)
        candidates = inputs.valid if inputs.protected is None else inputs.valid & ~inputs.protected
        budget = (counts - protected).clamp(min=0)
        scores = comparable(ranking, candidates)
        floor = torch.floor(self.alpha * budget.double()).long()
        scores = scores.masked_fill(keep_mask(scores, candidates, floor), math.inf)
        scores = scores.masked_fill(~candidates, -math.inf).reshape(batch, heads * length)
        total = torch.minimum(budget.sum(-1), candidates.flatten(1).sum(-1))  # [B]
        order = torch.argsort(scores, dim=-1, descending=True, stable=True)
        chosen = torch.zeros_like(scores, dtype=torch.bool)
        chosen.scatter_(-1, order, torch.arange(heads * length, device=scores.device) < total[:, None])
        return ranking, protected + chosen.reshape(batch, heads, length).sum(-1)
