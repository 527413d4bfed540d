"""Budgets decide how many tokens each layer and head keeps; the scorer decides which."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from kvsqueeze.components import Component
from kvsqueeze.scorers.base import Scorer, ScoringInputs
from kvsqueeze.selection import keep_mask

if TYPE_CHECKING:
    from kvsqueeze.cache import CompressedLayer


class Budget(Component):
    """Base class: ``allocate`` adjusts the per-head keep counts of one layer.

    The uniform budget (no ``Budget`` in the recipe) keeps ``protected + ceil((1 - ratio) *
    context tokens)`` in every head of every layer. A budget redistributes that total across
    layers (PyramidKV, CAKE) or heads (AdaKV), or sets its own counts (DuoAttention's streaming
    heads; then ``sets_own_counts`` is True and the recipe needs no ratio). ``state`` is a dict
    private to one cache, for budgets that remember earlier layers.

    Protected candidates (``inputs.protected``) are kept on top of any budget: a budget shares out
    ``counts - protected`` and adds the protected count back.
    """

    kind = "budget"
    sets_own_counts: bool = False
    retrims: bool = False
    """True when ``rebalance`` evicts from earlier layers again (CAKE): by count, so not with ``mixed``."""
    reads_later_layers: bool = False
    """True when allocating reads what layers the forward has not reached yet hold (CAKE reserves
    it), so it assumes they hold a compressed state: not so on KVzip's reconstruction pass."""

    def allocate(
        self, ranking: torch.Tensor, inputs: ScoringInputs, counts: torch.Tensor, state: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(ranking [B, Hkv, L], counts [B, Hkv])`` for this layer."""
        return ranking, counts

    def rebalance(self, layers: Sequence[CompressedLayer], layer_idx: int, state: dict) -> None:
        """Called once layer ``layer_idx`` has been compressed; may re-trim earlier layers.

        ``layers`` are the cache's layers. Only budgets whose earlier decisions depend on later
        layers (CAKE's cascading) override this; the default does nothing.
        """

    def default_scorer(self) -> Scorer | None:
        """The scorer a recipe uses when it names this budget alone (``duo``), or None."""
        return None


def protected_counts(inputs: ScoringInputs) -> torch.Tensor:
    """``[B, Hkv]`` protected candidates per head (0 when the inputs carry no protection)."""
    if inputs.protected is None:
        return torch.zeros(inputs.keys.shape[:2], dtype=torch.long, device=inputs.keys.device)
    return (inputs.protected & inputs.valid).sum(-1)


def with_protection(ranking: torch.Tensor, inputs: ScoringInputs) -> torch.Tensor:
    """``ranking`` with protected candidates at ``+inf`` (they are always kept)."""
    if inputs.protected is None:
        return ranking
    return ranking.masked_fill(inputs.protected, torch.inf)


def context_available(inputs: ScoringInputs) -> torch.Tensor:
    """``[B, Hkv]`` context tokens seen so far (``inputs.context_tokens``), or, for hand-built
    inputs without it, the valid unprotected candidates of each head."""
    if inputs.context_tokens is not None:
        return inputs.context_tokens[:, None].expand(inputs.keys.shape[:2]).long()
    return inputs.valid.sum(-1) - protected_counts(inputs)


def ranking_by_slot(ranking: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``[B, Hkv, S + 1]`` ranking indexed by slot (``-inf`` for slots not among the candidates)."""
    width = int(slots.max()) + 2 if slots.numel() else 1
    out = ranking.new_full((*ranking.shape[:2], width), -math.inf).float()
    out.scatter_(-1, torch.where(slots >= 0, slots, width - 1), ranking.float())
    out[..., -1] = -math.inf
    return out


def trim_layer(layer: CompressedLayer, by_slot: torch.Tensor, limit: torch.Tensor) -> None:
    """Keep, per head, the ``limit [B, Hkv]`` best stored tokens of ``layer`` by ``by_slot``."""
    view = layer.view()
    stored = view.slots >= 0
    index = view.slots.clamp(min=0, max=by_slot.shape[-1] - 2)
    ranking = by_slot.gather(-1, index).masked_fill(~stored, -math.inf)
    layer.keep(view, keep_mask(ranking, stored, limit), view.scores)
