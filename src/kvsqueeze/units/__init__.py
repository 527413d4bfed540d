"""Unit components (tokens kept or dropped together); ``UNITS`` maps recipe names to classes."""

from __future__ import annotations

from kvsqueeze.units.base import Unit, pool_by_unit, token_texts
from kvsqueeze.units.words import WholeWords

UNITS: dict[str, type[Unit]] = {cls.name: cls for cls in (WholeWords,)}

__all__ = ["UNITS", "Unit", "WholeWords", "pool_by_unit", "token_texts"]
