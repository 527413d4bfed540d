"""Turn importance scores into a keep set: top-k per (batch, KV head) under a per-head budget."""

from __future__ import annotations

import torch


def keep_mask(scores: torch.Tensor, valid: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, H, L]`` mask of the ``counts[b, h]`` highest-scoring valid candidates.

    Invalid candidates are never kept; a head with fewer valid candidates than its count keeps
    them all. Ties are broken towards the later candidate (more recent token), deterministically.
    """
    length = scores.shape[-1]
    counts = torch.minimum(counts.to(torch.long), valid.sum(-1))
    k_max = int(counts.max().item()) if counts.numel() else 0
    if k_max == 0:
        return torch.zeros_like(valid)
    ranked = scores.float().masked_fill(~valid, -torch.inf)
    # stable descending sort on reversed candidates = ties go to the most recent token
    order = torch.argsort(ranked.flip(-1), dim=-1, descending=True, stable=True)[..., :k_max]
    top = length - 1 - order
    take = torch.arange(k_max, device=scores.device) < counts[..., None]
    mask = torch.zeros_like(valid)
    mask.scatter_(-1, top, take)
    return mask & valid
