"""One score threshold over every layer and head, as KVzip selects."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kvsqueeze.budgets.base import Budget, protected_counts, ranking_by_slot, trim_layer, with_protection
from kvsqueeze.scorers.base import ScoringInputs
from kvsqueeze.selection import keep_mask

if TYPE_CHECKING:
    from kvsqueeze.cache import CompressedLayer


@dataclass
class GlobalThreshold(Budget):
    """Keep the best-ranked tokens of the whole model, wherever they are.

    The uniform budget summed over every layer and head (``(1 - ratio)`` of the context per head)
    goes to the highest rankings of all (layer, head, token) candidates, so a layer or head whose
    tokens score high keeps more and one whose tokens score low keeps fewer. Each layer keeps all
    its candidates while the forward runs; after the last layer every layer is trimmed to its
    share (``rebalance``). Rankings must be comparable across layers: KVzip's attention peaks
    (probabilities) are; protected tokens are kept on top, outside the threshold.
    """

    name = "global"
    citation = (
        "Kim et al., 2025. KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction "
        "(non-uniform budgets from one threshold over all heads). arXiv:2505.23416"
    )
    retrims = True

    def allocate(
        self, ranking: torch.Tensor, inputs: ScoringInputs, counts: torch.Tensor, state: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if inputs.layer_idx == 0 or "global" not in state:
            state["global"] = {"layers": {}}
        run = state["global"]
        run["last"] = inputs.num_layers - 1
        protected = protected_counts(inputs)
        unprotected = ranking.masked_fill(~inputs.valid, -math.inf)
        if inputs.protected is not None:
            unprotected = unprotected.masked_fill(inputs.protected, -math.inf)
        run["layers"][inputs.layer_idx] = _LayerRanking(
            ranking_by_slot(with_protection(ranking, inputs), inputs.slots),
            ranking_by_slot(unprotected, inputs.slots),
            protected,
            (counts - protected).clamp(min=0).sum(-1),
        )
        return ranking, inputs.valid.sum(-1)  # everything stays until the last layer is scored

    def rebalance(self, layers: Sequence[CompressedLayer], layer_idx: int, state: dict) -> None:
        run = state["global"]
        if layer_idx != run["last"]:
            return
        indices = sorted(run["layers"])
        scored = [run["layers"][i] for i in indices]
        width = max(r.unprotected.shape[-1] for r in scored)
        pad = [F.pad(r.unprotected, (0, width - r.unprotected.shape[-1]), value=-math.inf) for r in scored]
        candidates = torch.stack(pad, dim=1)  # [B, layers, Hkv, width]
        flat = candidates.reshape(candidates.shape[0], 1, -1)
        total = sum(r.budget for r in scored)[:, None]
        shares = keep_mask(flat, flat > -math.inf, total).reshape(candidates.shape).sum(-1)
        for column, (index, ranked) in enumerate(zip(indices, scored, strict=True)):
            trim_layer(layers[index], ranked.by_slot, ranked.protected + shares[:, column])
        run["layers"].clear()


@dataclass
class _LayerRanking:
    by_slot: torch.Tensor  # [B, Hkv, S + 1] ranking, protected at +inf (for the trim)
    unprotected: torch.Tensor  # the same, protected and invalid at -inf (for the threshold)
    protected: torch.Tensor  # [B, Hkv] protected tokens kept on top
    budget: torch.Tensor  # [B] the layer's uniform share, summed over its heads
