"""Decode-time compressors, one per file; ``DECODERS`` maps each recipe name to its class."""

from __future__ import annotations

from kvsqueeze.decoding.base import DecodeCompressor
from kvsqueeze.decoding.lazy import LazyEviction
from kvsqueeze.decoding.morphkv import MorphKV
from kvsqueeze.decoding.rkv import RKV
from kvsqueeze.decoding.scope import SCOPE
from kvsqueeze.decoding.with_scorer import DecodeWithScorer

_ALL = (DecodeWithScorer, RKV, SCOPE, LazyEviction, MorphKV)
DECODERS: dict[str, type[DecodeCompressor]] = {cls.name: cls for cls in _ALL}

__all__ = ["DECODERS", "RKV", "SCOPE", "DecodeCompressor", "DecodeWithScorer", "LazyEviction", "MorphKV"]
