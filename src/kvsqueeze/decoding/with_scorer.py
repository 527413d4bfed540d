"""``decode:scorer=NAME``: any stateless prefill scorer applied every ``every`` decode steps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.components import option
from kvsqueeze.decoding.base import DecodeCompressor
from kvsqueeze.scorers import SCORERS
from kvsqueeze.scorers.base import Scorer, ScoringInputs

USABLE_SCORERS = tuple(name for name, cls in SCORERS.items() if not (cls.stateful or cls.reconstructs))
"""Scorers that can rank held tokens from the latest decode queries alone: a stateful one (H2O)
would need its running score updated at every step, a reconstructing one (KVzip) a copy pass."""


@dataclass
class DecodeWithScorer(DecodeCompressor):
    """Keep, every ``every`` steps, the ``budget`` held tokens per head that ``scorer`` ranks
    highest against the last ``window`` decode queries (SnapKV: their attention; TOVA: the last
    one's; StreamingLLM: the sinks and the most recent tokens); the rest is dropped.

    Parameters
    ----------
    scorer : a prefill scorer's recipe name, with its default options except ``window``.
    window : decode queries the scorer sees; a scorer with a ``window`` option of its own
        (SnapKV's observation window) gets this one.
    """

    name = "decode"
    citation = "Periodic re-compression during decoding, as kvpress's DecodingPress (NVIDIA, 2025)"

    scorer: str = option("tova", choices=USABLE_SCORERS)
    window: int = option(8, minimum=1)

    @property
    def ranker(self) -> Scorer:
        scorer_cls = SCORERS[self.scorer]
        shared = {"window": self.window} if "window" in scorer_cls().options() else {}
        return scorer_cls(**shared)

    def observed_queries(self) -> int:
        return max(self.window, self.ranker.observed_queries())

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        return self.ranker.rank(inputs)[0]
