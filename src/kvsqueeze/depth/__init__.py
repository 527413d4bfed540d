"""Cross-layer components (adjacent layers share what they store); ``DEPTH`` maps recipe names to
classes."""

from __future__ import annotations

from kvsqueeze.depth.minicache import MiniCache

DEPTH: dict[str, type[MiniCache]] = {MiniCache.name: MiniCache}

__all__ = ["DEPTH", "MiniCache"]
