"""PyramidKV: layer budgets that shrink with depth, as attention funnels onto fewer tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.budgets.base import Budget, context_available, protected_counts
from kvsqueeze.components import option
from kvsqueeze.scorers.base import ScoringInputs


def pyramid_shares(budget: torch.Tensor, available: torch.Tensor, layer: int, layers: int, beta: float):
    """Tokens layer ``layer`` of ``layers`` keeps when the uniform budget is ``budget``.

    The per-layer budgets form an arithmetic sequence from ``top = 2 * budget - budget / beta`` at
    the bottom layer down to ``budget / beta`` at the top one, so they average to ``budget``. When
    ``top`` exceeds the ``available`` tokens, the bottom layer keeps them all and the top keeps
    ``2 * budget - available`` (same mean). Each share is rounded down and the tokens lost to
    rounding go one each to the lowest layers, so the counts still decrease with depth and add up
    to exactly ``layers * budget``. All tensors are ``[B, Hkv]`` (long).
    """
    exact = budget.double()
    low = exact / beta
    high = 2 * exact - low
    over = high > available
    high = torch.where(over, available.double(), high)
    low = torch.where(over, 2 * exact - high, low)
    depth = torch.arange(layers, dtype=torch.float64)
    shares = high[..., None] - depth * ((high - low) / max(layers - 1, 1))[..., None]  # [B, Hkv, layers]
    whole = torch.floor(shares + 1e-9)  # the epsilon keeps exact integers from flooring down
    missing = layers * budget - whole.sum(-1).long()  # < layers
    return whole[..., layer].long() + (layer < missing).long()


@dataclass
class PyramidKV(Budget):
    """Keep more tokens in the lower layers and fewer in the upper ones, same total as uniform.

    Layer ``l`` of ``L`` keeps ``top - l * (top - bottom) / (L - 1)`` context tokens per head,
    with ``bottom = b / beta`` and ``top = 2b - bottom`` for the uniform per-head budget ``b``
    (the schedule of the paper's reference code, KVCache-Factory): the mean over layers is ``b``,
    so the cache holds as many tokens as the uniform budget would, shared out as a pyramid.
    Protected tokens (the question in query-aware mode) are kept on top, in every layer. The
    scorer's own window (SnapKV's) counts inside each layer's budget, where the reference code
    keeps it on top.

    Parameters
    ----------
    beta : steepness; the top layer keeps ``1 / beta`` of the uniform budget (1 = uniform).
    """

    name = "pyramid"
    citation = (
        "Cai et al., 2024. PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information "
        "Funneling. arXiv:2406.02069"
    )

    beta: float = option(20.0, minimum=1)

    def allocate(
        self, ranking: torch.Tensor, inputs: ScoringInputs, counts: torch.Tensor, state: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        protected = protected_counts(inputs)
        budget = (counts - protected).clamp(min=0)
        available = torch.maximum(context_available(inputs), budget)
        share = pyramid_shares(budget, available, inputs.layer_idx, inputs.num_layers, self.beta)
        return ranking, protected + share
