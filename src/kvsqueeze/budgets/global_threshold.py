"""One score threshold over every layer and head, as KVzip selects."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvsqueeze.budgets.base import Budget, LayerRanking
from kvsqueeze.selection import keep_mask


@dataclass
class GlobalThreshold(Budget):
    """Keep the best-ranked tokens of the whole model, wherever they are.

    The uniform budget summed over every layer and head (``(1 - ratio)`` of the context per head)
    goes to the highest rankings of all (layer, head, token) candidates of the compression step,
    so a layer or head whose tokens score high keeps more and one whose tokens score low keeps
    fewer. Rankings must be comparable across layers: KVzip's attention peaks (probabilities)
    are; protected tokens are kept on top, outside the threshold.
    """

    name = "global"
    citation = (
        "Kim et al., 2025. KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction "
        "(non-uniform budgets from one threshold over all heads). arXiv:2505.23416"
    )

    def across_layers(self, layers: list[LayerRanking], state: dict) -> None:
        width = max(layer.ranking.shape[-1] for layer in layers)
        candidates = []
        for layer in layers:
            ranked = layer.ranking.float().masked_fill(~layer.valid | layer.protected, -math.inf)
            candidates.append(F.pad(ranked, (0, width - ranked.shape[-1]), value=-math.inf))
        stacked = torch.stack(candidates, dim=1)  # [B, layers, Hkv, width]
        flat = stacked.reshape(stacked.shape[0], 1, -1)
        protected = [layer.protected_counts for layer in layers]
        total = sum(
            (layer.counts - kept).clamp(min=0).sum(-1) for layer, kept in zip(layers, protected, strict=True)
        )
        shares = keep_mask(flat, flat > -math.inf, total[:, None]).reshape(stacked.shape).sum(-1)
        for column, (layer, kept) in enumerate(zip(layers, protected, strict=True)):
            layer.counts = kept + shares[:, column]
