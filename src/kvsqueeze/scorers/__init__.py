"""Eviction scorers, one per file; ``SCORERS`` maps each recipe name to its class."""

from __future__ import annotations

from kvsqueeze.scorers.base import NEVER_EVICT, Scorer, ScoringInputs
from kvsqueeze.scorers.chunkkv import ChunkKV
from kvsqueeze.scorers.expected import ExpectedAttention
from kvsqueeze.scorers.h2o import H2O
from kvsqueeze.scorers.keydiff import KeyDiff
from kvsqueeze.scorers.knorm import KNorm
from kvsqueeze.scorers.kvzap import KVzap
from kvsqueeze.scorers.kvzip import KVzip
from kvsqueeze.scorers.random_baseline import RandomScorer
from kvsqueeze.scorers.snapkv import SnapKV
from kvsqueeze.scorers.streaming import StreamingLLM
from kvsqueeze.scorers.tova import TOVA

_ALL = (
    RandomScorer,
    StreamingLLM,
    KNorm,
    H2O,
    TOVA,
    SnapKV,
    ExpectedAttention,
    KeyDiff,
    ChunkKV,
    KVzip,
    KVzap,
)
SCORERS: dict[str, type[Scorer]] = {cls.name: cls for cls in _ALL}

__all__ = [
    "H2O",
    "NEVER_EVICT",
    "SCORERS",
    "TOVA",
    "ChunkKV",
    "ExpectedAttention",
    "KNorm",
    "KVzap",
    "KVzip",
    "KeyDiff",
    "RandomScorer",
    "Scorer",
    "ScoringInputs",
    "SnapKV",
    "StreamingLLM",
]
