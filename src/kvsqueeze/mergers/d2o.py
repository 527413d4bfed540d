"""D2O: merge each evicted token into its most similar kept token (D2O's compensation, after CaM)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvsqueeze.mergers.base import Merger, absorb

ROWS_PER_STEP = 1024
"""Evicted-token rows of the ``[rows, L]`` similarity matrix computed at once (bounds memory)."""


def nearest(
    keys: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each entry, the highest cosine similarity of its key to a key of ``columns [B, H, L]``
    in the same head and that entry's index, ``[B, H, L]`` each; ``-inf`` / ``-1`` where the entry
    is not in ``rows [B, H, L]`` or the head has no column."""
    unit = F.normalize(keys.float(), dim=-1)
    best = torch.full(rows.shape, -math.inf, device=keys.device)
    index = torch.full(rows.shape, -1, dtype=torch.long, device=keys.device)
    for start in range(0, keys.shape[2], ROWS_PER_STEP):
        part = slice(start, start + ROWS_PER_STEP)
        similarity = unit[:, :, part] @ unit.transpose(-1, -2)
        similarity = similarity.masked_fill(~columns[:, :, None, :], -math.inf)
        best[:, :, part], index[:, :, part] = similarity.max(-1)
    missing = ~rows | torch.isinf(best)
    return best.masked_fill(missing, -math.inf), index.masked_fill(missing, -1)


@dataclass
class D2O(Merger):
    """Merge what the scorer evicts into the most similar kept token of the same head.

    Each evicted token ``i`` finds the kept 16-bit token ``c`` whose key has the highest cosine
    similarity ``u_i`` to its own; it is merged when ``u_i`` reaches the head's threshold, the
    mean of ``u`` over the tokens this compression step evicts from that head (D2O's EMA
    threshold, averaged within one step: a cache carries no merge state between steps, so a
    saved, batched or reordered cache merges as a fresh one would). The kept token's key and
    value become ``(e x_c + sum_i exp(u_i) x_i) / (e + sum_i exp(u_i))`` over the tokens merged
    into it: D2O's weights, ``e = exp(1)`` the kept token's similarity to itself. Dissimilar
    evicted tokens are dropped. No options. (The authors' code, AIoT-MLSys-Lab/d2o, read for this:
    its threshold is an EMA across steps of the head-averaged similarity, and it merges only into the
    recent window, as ``include_self`` means of similarity-scaled states, not the paper's weights.)
    """

    name = "d2o"
    citation = (
        "Wan et al., 2024. D2O: Dynamic Discriminative Operations for Efficient Long-Context "
        "Inference of Large Language Models. arXiv:2406.13035 (merge after CaM, ICML 2024)"
    )

    def merge(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        keep: torch.Tensor,
        dropped: torch.Tensor,
        into: torch.Tensor,
        scores: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        similarity, target = nearest(keys, dropped, into)
        found = target >= 0
        threshold = torch.where(found, similarity, 0.0).sum(-1) / found.sum(-1).clamp(min=1)
        target = target.masked_fill(similarity < threshold[..., None], -1)
        own = torch.full_like(similarity, math.e)
        return absorb(keys, values, target, similarity.exp(), own)
