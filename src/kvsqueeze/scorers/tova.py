"""TOVA: the last query's attention, averaged over all heads of the layer, decides."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.scorers.base import Scorer, ScoringInputs, sum_by_slot


@dataclass
class TOVA(Scorer):
    """Keep the tokens the most recent query attends to most, with one ranking per layer.

    Score of a token = attention from the last query of the chunk, averaged over all ``Hq`` query
    heads of the layer (a head that no longer holds the token contributes 0), so every KV head
    ranks its tokens the same way. ``[B, Hkv, L]``.
    """

    name = "tova"
    citation = "Oren et al., 2024. Transformers are Multi-State RNNs. arXiv:2401.06104"
    needs_attention = True

    def observed_queries(self) -> int:
        return 1

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        per_kv_head = inputs.attention_mass(last=1).sum(2)
        # heads are matched by slot: after per-head eviction the same index holds different tokens
        total = sum_by_slot(per_kv_head, inputs.slots, inputs.valid)
        return total / inputs.queries.shape[1]
