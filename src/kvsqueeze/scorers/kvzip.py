"""KVzip: score each context token by how much the model needs it to repeat the context."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.components import option
from kvsqueeze.scorers.base import NEVER_EVICT, Scorer, ScoringInputs, first_valid


@dataclass
class KVzip(Scorer):
    """Keep the tokens the model attends to most while reconstructing the context.

    Query-agnostic by construction: the context is prefilled uncompressed, then fed again as a
    copy, ``chunk`` tokens per forward, each piece after a repeat request
    (``kvsqueeze.prefill.ReconstructionPrefill``); this scorer runs on that pass, whose queries
    are the copy. A candidate scores the largest attention probability any reconstruction query
    of any piece and any query head of its group gives it, ``[B, Hkv, L]``; the first ``sinks``
    valid tokens score ``NEVER_EVICT``. Each piece of the copy is protected and dropped after its
    forward, so only context tokens compete for the budget.

    Parameters
    ----------
    sinks : number of initial tokens always kept (attention sinks).
    chunk : copy tokens per reconstruction forward (fewer when the model's window has no room
        for them after the context); peak KV memory is context + request + chunk.
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
    chunk: int = option(2048, minimum=16)

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        peak = inputs.attention_peak().amax(2)
        return peak.masked_fill(first_valid(inputs.valid, self.sinks), NEVER_EVICT)
