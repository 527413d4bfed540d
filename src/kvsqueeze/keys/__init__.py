"""Key reducers (fewer stored numbers per key), one per file; ``KEY_REDUCERS`` maps recipe names
to classes."""

from __future__ import annotations

from kvsqueeze.keys.base import KeyReducer, PlainBlocks, ReducedKeys
from kvsqueeze.keys.lowrank import LowRankKeys
from kvsqueeze.keys.think import ThinK

KEY_REDUCERS: dict[str, type[KeyReducer]] = {cls.name: cls for cls in (ThinK, LowRankKeys)}

__all__ = ["KEY_REDUCERS", "KeyReducer", "LowRankKeys", "PlainBlocks", "ReducedKeys", "ThinK"]
