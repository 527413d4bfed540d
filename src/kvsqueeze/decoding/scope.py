"""SCOPE: the prompt kept whole, the generated tokens bounded by heavy hitters + a recent window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.components import option
from kvsqueeze.decoding.base import DecodeCompressor
from kvsqueeze.scorers.base import NEVER_EVICT, ScoringInputs, last_valid


@dataclass
class SCOPE(DecodeCompressor):
    """Keep the prompt (``frozen``) and, of the generated tokens, the most recent ones plus the
    heavy hitters of the latest decode query; drop the other generated tokens.

    Every ``every`` steps, ``recent_share`` of each head's ``budget`` goes to its most recent
    candidates and the rest to the candidates the latest decode query attends to most (averaged
    over the query heads of the KV head), ``[B, Hkv, L]``. This is SCOPE's *slide* selection run
    on its *discontinuous* schedule (heavy hitters re-selected every T = ``every`` steps rather
    than at every step, which the paper introduces to cut memory transfers); ``every=1`` is the
    slide strategy itself. The *adaptive* strategy (a decoding budget growing with the answer)
    is not this class; ``keep=F`` grows the budget in proportion instead.

    Parameters
    ----------
    recent_share : fraction of the budget held by the most recent generated tokens (the authors'
        code: 256 recent of a 512-token decoding budget).
    """

    name = "scope"
    citation = (
        "Wu et al., 2024. SCOPE: Optimizing Key-Value Cache Compression in Long-context "
        "Generation. arXiv:2412.13649"
    )

    budget: int = option(512, minimum=1)
    frozen: bool = option(True)
    recent_share: float = option(0.5, minimum=0, maximum=1)

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        candidates = inputs.valid if inputs.protected is None else inputs.valid & ~inputs.protected
        heavy = inputs.attention_mass(last=1).mean(2)
        recent = last_valid(candidates, torch.floor(self.recent_share * inputs.budget).long())
        return heavy.masked_fill(recent, NEVER_EVICT)
