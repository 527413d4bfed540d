"""Quantizers store kept tokens in packed low-bit form; see ``kvsqueeze.cache`` for storage."""

from __future__ import annotations

from kvsqueeze.components import Component


class Quantizer(Component):
    """Base class of packed KV quantizers (the storage layer calls them)."""

    kind = "quantizer"
