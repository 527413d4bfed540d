"""Budgets decide how many tokens each layer and head keeps; the scorer decides which."""

from __future__ import annotations

import torch

from kvsqueeze.components import Component
from kvsqueeze.scorers.base import ScoringInputs


class Budget(Component):
    """Base class: ``allocate`` adjusts the per-head keep counts of one layer.

    The uniform budget (no ``Budget`` in the recipe) keeps ``protected + ceil((1 - ratio) *
    context tokens)`` in every head of every layer. A budget redistributes that total across
    layers (PyramidKV, CAKE) or heads (AdaKV), or sets its own counts (DuoAttention's streaming
    heads; then ``sets_own_counts`` is True and the recipe needs no ratio). ``state`` is a dict
    private to one cache, for budgets that remember earlier layers.
    """

    kind = "budget"
    sets_own_counts: bool = False

    def allocate(
        self, ranking: torch.Tensor, inputs: ScoringInputs, counts: torch.Tensor, state: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(ranking [B, Hkv, L], counts [B, Hkv])`` for this layer."""
        return ranking, counts
