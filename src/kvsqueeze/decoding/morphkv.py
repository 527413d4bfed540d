"""MorphKV: a recent window plus the older tokens that window's queries attend to, constant size."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kvsqueeze.components import option
from kvsqueeze.decoding.base import DecodeCompressor, observation_window
from kvsqueeze.scorers.base import NEVER_EVICT, ScoringInputs


@dataclass
class MorphKV(DecodeCompressor):
    """Keep the last ``window`` tokens (R) and the ``budget - window`` older tokens (C) their
    decode queries attend to most; drop every other older token, so a head holds C + R.

    Each of the window's queries attends over the older candidates only (its softmax leaves the
    window out, as the authors' code does); the attention is averaged over the query heads of a
    KV head and fused over the window's queries by ``fusion``: ``sum`` (total attention) or
    ``max`` (the largest any one query gives). ``[B, Hkv, L]``; the window is always kept.
    An older token the window ignores is dropped even if it was attended long ago.

    Parameters
    ----------
    window : recent tokens kept, whose queries rank the older ones (R; the authors run R=32 with
        C+R=2000 on LongBench and R=200 with C+R=4000 on long-response LongGenBench).
    fusion : ``max`` (the authors' long-response setting) or ``sum`` (their long-context one).
    """

    name = "morphkv"
    citation = (
        "Ghadia et al., 2025. Dialogue Without Limits: Constant-Sized KV Caches for Extended "
        "Responses in LLMs. arXiv:2503.00979"
    )

    window: int = option(32, minimum=1)
    fusion: str = option("max", choices=("max", "sum"))

    def observed_queries(self) -> int:
        return self.window

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        recent = observation_window(inputs)
        older = dataclasses.replace(inputs, valid=inputs.valid & ~recent, _probs_cache={})
        attention = older.attention(last=self.window).mean(2)
        fused = attention.amax(2) if self.fusion == "max" else attention.sum(2)
        return fused.masked_fill(recent, NEVER_EVICT)
