"""Decode-time compressors, one per file; ``DECODERS`` maps each recipe name to its class."""

from __future__ import annotations

from kvsqueeze.decoding.base import DecodeCompressor
from kvsqueeze.decoding.with_scorer import DecodeWithScorer

DECODERS: dict[str, type[DecodeCompressor]] = {cls.name: cls for cls in (DecodeWithScorer,)}

__all__ = ["DECODERS", "DecodeCompressor", "DecodeWithScorer"]
