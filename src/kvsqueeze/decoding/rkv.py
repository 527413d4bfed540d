"""R-KV: keep the tokens recent decode queries attend to, minus those that repeat other tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.components import option
from kvsqueeze.decoding.base import DecodeCompressor, observation_window
from kvsqueeze.scorers.base import NEVER_EVICT, ScoringInputs, pool_over_neighbours
from kvsqueeze.scorers.keydiff import unit_keys


def key_redundancy(keys: torch.Tensor, candidates: torch.Tensor, threshold: float) -> torch.Tensor:
    """``[B, H, L]`` redundancy of each candidate: its mean key cosine similarity to the other
    candidates, softmax-normalised over the head's candidates (R-KV's redundancy estimate).

    Each candidate's similarity to its most recent near-duplicate (the latest other candidate
    with similarity above ``threshold``) does not count, so of a run of copies the latest one is
    the least redundant: it is the one kept. Only the candidates are compared (gathered first, in
    order), so a frozen prompt in the same row costs nothing.
    """
    width = int(candidates.sum(-1).max()) if candidates.numel() else 0
    order = torch.argsort((~candidates).to(torch.uint8), dim=-1, stable=True)[..., :width]
    picked = candidates.gather(-1, order)
    unit = unit_keys(keys.gather(2, order[..., None].expand(-1, -1, -1, keys.shape[-1])), picked)
    similarity = unit @ unit.transpose(-1, -2)
    similarity.diagonal(dim1=-2, dim2=-1).zero_()
    index = torch.arange(width, device=keys.device)
    copies = (similarity > threshold) & picked[..., None, :]
    latest_copy = torch.where(copies, index, -1).amax(-1, keepdim=True)
    similarity = similarity.masked_fill((index == latest_copy) & (latest_copy >= 0), 0.0)
    mean = similarity.sum(-2) / picked.sum(-1, keepdim=True).clamp(min=1)
    redundancy = torch.softmax(mean.masked_fill(~picked, -torch.inf), dim=-1).nan_to_num(0.0)
    return torch.zeros(candidates.shape, device=keys.device).scatter(-1, order, redundancy)


@dataclass
class RKV(DecodeCompressor):
    """Keep the tokens that are important and not redundant; drop repeats of other tokens.

    ``importance`` is the attention each candidate receives from the last ``window`` decode
    queries (averaged over them, the largest over the query heads of its KV head), max-pooled
    over ``kernel_size`` neighbours; ``redundancy`` is ``key_redundancy``. The ``[B, Hkv, L]``
    score is ``lambda_ * importance - (1 - lambda_) * redundancy``; the ``window`` observation
    tokens themselves are always kept. A token that duplicates a later one (same key direction)
    is dropped even when it is attended as much as its copy, which attention alone keeps both of.

    Parameters
    ----------
    window : decode queries whose attention scores the candidates (the paper's alpha; 8 in the
        authors' code).
    lambda_ : weight of importance against redundancy (the paper's lambda; 0.1 in the authors'
        evaluation script).
    kernel_size : neighbours the importance is max-pooled over (odd; 7 in the authors' code).
    threshold : cosine similarity above which two keys count as copies (0.5 in the authors' code).
    """

    name = "rkv"
    citation = (
        "Cai et al., 2025. R-KV: Redundancy-aware KV Cache Compression for Training-Free Reasoning "
        "Models Acceleration. arXiv:2505.24133"
    )

    window: int = option(8, minimum=1)
    lambda_: float = option(0.1, minimum=0, maximum=1)
    kernel_size: int = option(7, minimum=1, odd=True)
    threshold: float = option(0.5, minimum=-1, maximum=1)

    def observed_queries(self) -> int:
        return self.window

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        candidates = inputs.valid if inputs.protected is None else inputs.valid & ~inputs.protected
        attention = inputs.attention(last=self.window).mean(3).amax(2)
        importance = pool_over_neighbours(attention, self.kernel_size, inputs.valid)
        redundancy = key_redundancy(inputs.keys, candidates, self.threshold)
        score = self.lambda_ * importance - (1 - self.lambda_) * redundancy
        return score.masked_fill(observation_window(inputs), NEVER_EVICT)
