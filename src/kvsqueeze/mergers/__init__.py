"""Merging components (what eviction drops is folded into kept tokens); ``MERGERS`` maps each
recipe name to its class."""

from __future__ import annotations

from kvsqueeze.mergers.base import Merger, absorb
from kvsqueeze.mergers.d2o import D2O
from kvsqueeze.mergers.kvmerger import KVMerger

MERGERS: dict[str, type[Merger]] = {cls.name: cls for cls in (D2O, KVMerger)}

__all__ = ["D2O", "MERGERS", "KVMerger", "Merger", "absorb"]
