"""SnapKV: an observation window of recent queries votes for the tokens to keep."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.components import option
from kvsqueeze.scorers.base import NEVER_EVICT, Scorer, ScoringInputs, pool_over_neighbours


def window_attention(inputs: ScoringInputs, window: int) -> torch.Tensor:
    """``[B, Hkv, L]`` attention from the last ``window`` queries, summed over them and averaged
    over the ``n_rep`` query heads of each KV head."""
    return inputs.attention_mass(last=window).mean(2)


def observation_window(inputs: ScoringInputs, window: int) -> torch.Tensor:
    """``[B, Hkv, L]`` bool: valid candidates at or after the first of the last ``window`` queries."""
    first = inputs.query_slots[:, max(inputs.num_queries - window, 0)]
    return inputs.valid & (inputs.slots >= first[:, None, None])


@dataclass
class SnapKV(Scorer):
    """Keep the prefix tokens the observation window attends to, plus the window itself.

    Prefix tokens score their window attention (see ``window_attention``), max-pooled over
    ``kernel_size`` neighbouring candidates so the context around a hit survives too. Window
    tokens score ``NEVER_EVICT`` and, as in the paper, do not take part in the pooling.
    ``[B, Hkv, L]``.

    Parameters
    ----------
    window : number of most recent queries forming the observation window.
    kernel_size : width of the max-pooling over neighbouring candidates (odd; 1 = no pooling).
    """

    name = "snapkv"
    citation = (
        "Li et al., 2024. SnapKV: LLM Knows What You are Looking for Before Generation. arXiv:2404.14469"
    )
    needs_attention = True

    window: int = option(32, minimum=1)
    kernel_size: int = option(7, minimum=1, odd=True)

    def observed_queries(self) -> int:
        return self.window

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        in_window = observation_window(inputs, self.window)
        votes = window_attention(inputs, self.window)
        pooled = pool_over_neighbours(votes, self.kernel_size, inputs.valid & ~in_window)
        return pooled.masked_fill(in_window, NEVER_EVICT)
