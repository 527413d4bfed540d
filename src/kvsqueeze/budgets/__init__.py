"""Layer/head budgets, one per file; ``BUDGETS`` maps each recipe name to its class."""

from __future__ import annotations

from kvsqueeze.budgets.adakv import AdaKV
from kvsqueeze.budgets.base import Budget
from kvsqueeze.budgets.cake import CAKE
from kvsqueeze.budgets.duo import DuoAttention
from kvsqueeze.budgets.global_threshold import GlobalThreshold
from kvsqueeze.budgets.pyramid import PyramidKV

_ALL = (PyramidKV, AdaKV, CAKE, DuoAttention, GlobalThreshold)
BUDGETS: dict[str, type[Budget]] = {cls.name: cls for cls in _ALL}

__all__ = ["BUDGETS", "CAKE", "AdaKV", "Budget", "DuoAttention", "GlobalThreshold", "PyramidKV"]
