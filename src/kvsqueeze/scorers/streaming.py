"""StreamingLLM: attention sinks plus a window of recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.components import option
from kvsqueeze.scorers.base import NEVER_EVICT, Scorer, ScoringInputs, first_valid


@dataclass
class StreamingLLM(Scorer):
    """Keep the first ``sinks`` valid tokens of each head and then the most recent ones.

    The sinks score ``NEVER_EVICT``; every other candidate scores its slot, so under a budget of
    ``k`` the kept set is the sinks plus the ``k - sinks`` most recent valid tokens. Left-padding
    (invalid) candidates are skipped when counting sinks. Returns ``[B, Hkv, L]``.

    Parameters
    ----------
    sinks : number of initial tokens kept as attention sinks.
    """

    name = "streaming"
    citation = "Xiao et al., 2023. Efficient Streaming Language Models with Attention Sinks. arXiv:2309.17453"

    sinks: int = option(4, minimum=0)

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        recency = inputs.slots.float()
        return recency.masked_fill(first_valid(inputs.valid, self.sinks), NEVER_EVICT)
