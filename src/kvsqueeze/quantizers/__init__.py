"""Packed KV quantizers, one per file; ``QUANTIZERS`` maps each recipe name to its class."""

from __future__ import annotations

from kvsqueeze.quantizers.base import Quantizer

QUANTIZERS: dict[str, type[Quantizer]] = {}

__all__ = ["QUANTIZERS", "Quantizer"]
