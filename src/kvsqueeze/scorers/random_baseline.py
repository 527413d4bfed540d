"""Random eviction: the baseline every other scorer has to beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.components import option
from kvsqueeze.scorers.base import Scorer, ScoringInputs


@dataclass
class RandomScorer(Scorer):
    """Keep a uniformly random subset of the candidates.

    Scores are i.i.d. ``U(0, 1)`` of shape ``[B, Hkv, L]``, drawn from a CPU generator seeded with
    ``seed + 1000 * layer_idx`` so runs are reproducible on any device and layers differ.

    Parameters
    ----------
    seed : base seed of the generator.
    """

    name = "random"
    citation = "Random eviction baseline (no paper)."

    seed: int = option(0, minimum=0)

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + 1000 * inputs.layer_idx)
        return torch.rand(inputs.valid.shape, generator=generator).to(inputs.keys.device)
