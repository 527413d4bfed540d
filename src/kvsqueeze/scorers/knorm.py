"""K-norm: keys with a small L2 norm tend to receive the most attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.scorers.base import Scorer, ScoringInputs


@dataclass
class KNorm(Scorer):
    """Keep the keys with the lowest L2 norm and drop the high-norm ones.

    Score ``-||k||_2`` per candidate, ``[B, Hkv, L, D] -> [B, Hkv, L]``; needs no queries.
    """

    name = "knorm"
    citation = (
        "Devoto et al., 2024. A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression. "
        "arXiv:2406.11430"
    )

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        return -inputs.keys.float().norm(dim=-1)
