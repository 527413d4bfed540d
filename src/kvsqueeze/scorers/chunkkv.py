"""ChunkKV: keep or drop whole chunks of consecutive tokens, the same chunks in every head."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.components import option
from kvsqueeze.scorers.base import NEVER_EVICT, Scorer, ScoringInputs, sum_by_slot
from kvsqueeze.scorers.snapkv import observation_window, window_attention


@dataclass
class ChunkKV(Scorer):
    """Keep the chunks of ``chunk_size`` consecutive slots that the observation window attends to.

    Token votes are SnapKV's (attention of the last ``window`` queries, summed over them, averaged
    over each KV head's query heads). A chunk (``slot // chunk_size``, so it survives earlier
    evictions) scores the mean vote of its valid prefix entries over all heads of the layer; every
    token gets its chunk's score, so top-k keeps whole chunks and the same ones in every head.
    Observation-window tokens score ``NEVER_EVICT`` and are left out of the chunk scores.
    ``[B, Hkv, L]``.

    Parameters
    ----------
    chunk_size : number of consecutive slots per chunk.
    window : number of most recent queries forming the observation window.
    """

    name = "chunkkv"
    citation = (
        "Liu et al., 2025. ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context "
        "LLM Inference. arXiv:2502.00299"
    )
    needs_attention = True

    chunk_size: int = option(10, minimum=1)
    window: int = option(32, minimum=1)

    def observed_queries(self) -> int:
        return self.window

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        in_window = observation_window(inputs, self.window)
        prefix = inputs.valid & ~in_window
        votes = window_attention(inputs, self.window)
        total = sum_by_slot(votes, inputs.slots, prefix, self.chunk_size)
        # the mean, not the sum, so a chunk cut short (sequence end, window start) is not penalised
        count = sum_by_slot(prefix.float(), inputs.slots, prefix, self.chunk_size)
        return (total / count.clamp(min=1)).masked_fill(in_window, NEVER_EVICT)
