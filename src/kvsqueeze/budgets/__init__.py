"""Layer/head budgets, one per file; ``BUDGETS`` maps each recipe name to its class."""

from __future__ import annotations

from kvsqueeze.budgets.base import Budget

BUDGETS: dict[str, type[Budget]] = {}

__all__ = ["BUDGETS", "Budget"]
