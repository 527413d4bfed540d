"""KeyDiff: keep the keys that differ most from the average key direction."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvsqueeze.scorers.base import Scorer, ScoringInputs


def unit_keys(keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, D]`` keys scaled to unit length in float32, 0 where ``valid [B, H, L]`` is False:
    their dot products are cosine similarities, and invalid candidates add nothing to sums."""
    return torch.where(valid[..., None], F.normalize(keys.float(), dim=-1), 0.0)


@dataclass
class KeyDiff(Scorer):
    """Keep distinctive keys, drop the ones pointing along the head's mean key direction.

    The anchor is the mean of the L2-normalised valid keys of each head (``[B, Hkv, D]``);
    each candidate scores ``-cos(k, anchor)``, ``[B, Hkv, L]``. Needs no queries.
    """

    name = "keydiff"
    citation = (
        "Park et al., 2025. KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM "
        "Inference in Resource-Constrained Environments. arXiv:2504.15364"
    )

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        unit = unit_keys(inputs.keys, inputs.valid)
        anchor = unit.sum(2, keepdim=True) / inputs.valid[..., None].sum(2, keepdim=True).clamp(min=1)
        return -F.cosine_similarity(inputs.keys.float(), anchor, dim=-1)
