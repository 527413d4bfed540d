"""H2O: heavy hitters (accumulated attention) plus a local window of recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.components import option
from kvsqueeze.scorers.base import Scorer, ScoringInputs, last_valid


@dataclass
class H2O(Scorer):
    """Keep the tokens that have received the most attention so far (the heavy hitters).

    ``score`` is the running state: ``previous_scores`` (0 if None) plus the attention mass each
    candidate receives from all queries of this chunk, averaged over the ``n_rep`` query heads of
    its KV head, ``[B, Hkv, L]``. As in the paper, the budget is shared between heavy hitters and
    a window of the most recent tokens: ``recent_share`` of each head's budget goes to the window,
    protected through ``protect`` so that ``NEVER_EVICT`` never enters the stored state.

    Parameters
    ----------
    recent_share : fraction of each head's budget kept for the most recent tokens (the paper
        balances the two halves; 0 = heavy hitters only).
    """

    name = "h2o"
    citation = (
        "Zhang et al., 2023. H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large "
        "Language Models. arXiv:2306.14048"
    )
    stateful = True
    needs_attention = True
    statistics = ("attention_mass",)

    recent_share: float = option(0.5, minimum=0, maximum=1)

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        received = inputs.attention_mass().mean(2)
        if inputs.previous_scores is None:
            return received
        return inputs.previous_scores.to(received) + received

    def protect(self, inputs: ScoringInputs) -> torch.Tensor | None:
        if self.recent_share <= 0 or inputs.budget is None:
            return None
        return last_valid(inputs.valid, torch.floor(self.recent_share * inputs.budget).long())
