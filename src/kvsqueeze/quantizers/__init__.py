"""Packed KV quantizers, one per file; ``QUANTIZERS`` maps each recipe name to its class."""

from __future__ import annotations

from kvsqueeze.quantizers.base import Quantizer
from kvsqueeze.quantizers.gear import GEAR
from kvsqueeze.quantizers.kivi import KIVI2, KIVI4
from kvsqueeze.quantizers.mixed import MixedPrecision

QUANTIZERS: dict[str, type[Quantizer]] = {cls.name: cls for cls in (KIVI2, KIVI4, GEAR, MixedPrecision)}

__all__ = ["GEAR", "KIVI2", "KIVI4", "QUANTIZERS", "MixedPrecision", "Quantizer"]
