"""KVzip: score each context token by how much the model needs it to repeat the context."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.components import option
from kvsqueeze.scorers.base import NEVER_EVICT, Scorer, ScoringInputs, first_valid


@dataclass
class KVzip(Scorer):
    """Keep the tokens the model attends to most while reconstructing the context.

    Query-agnostic by construction: the engine prefills the context uncompressed, then feeds a
    repeat request followed by a copy of the context (``engine.prefill_context``); this scorer
    runs on that pass, whose queries are the copy. A candidate scores the largest attention
    probability any reconstruction query of any query head of its group gives it, ``[B, Hkv, L]``;
    the first ``sinks`` valid tokens score ``NEVER_EVICT``. The copy itself is protected by the
    engine and dropped after scoring, so only context tokens compete for the budget.

    Parameters
    ----------
    sinks : number of initial tokens always kept (attention sinks).
    """

    name = "kvzip"
    citation = (
        "Kim et al., 2025. KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction. "
        "arXiv:2505.23416"
    )
    needs_attention = True
    reconstructs = True
    statistics = ("attention_peak",)

    sinks: int = option(4, minimum=0)

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        peak = inputs.attention_peak().amax(2)
        return peak.masked_fill(first_valid(inputs.valid, self.sinks), NEVER_EVICT)
