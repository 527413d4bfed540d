"""Budgets decide how many tokens each layer and head keeps; the scorer decides which."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvsqueeze.components import Component
from kvsqueeze.scorers.base import Scorer, ScoringInputs

if TYPE_CHECKING:
    from kvsqueeze.budgets.head_profile import HeadProfile


@dataclass
class LayerRanking:
    """One layer's ranking, what ``Recipe.rank`` returns and budgets share out.

    ``ranking [B, Hkv, L]`` (protected candidates at ``+inf``), ``valid`` and ``protected``
    ``[B, Hkv, L]`` bool, ``counts [B, Hkv]`` tokens each head keeps (protected ones included; a
    budget's ``across_layers`` may change them), ``scorer_state`` the running score a stateful
    scorer stores, or None.
    """

    layer_idx: int
    ranking: torch.Tensor
    valid: torch.Tensor
    protected: torch.Tensor
    counts: torch.Tensor
    scorer_state: torch.Tensor | None

    @property
    def protected_counts(self) -> torch.Tensor:
        return (self.protected & self.valid).sum(-1)


class Budget(Component):
    """Base class: ``allocate`` adjusts one layer's per-head keep counts, ``across_layers`` may
    share the total across layers once every layer of the compression step was ranked.

    The uniform budget (no ``Budget`` in the recipe) keeps ``protected + ceil((1 - ratio) *
    context tokens)`` in every head of every layer. A budget redistributes that total across
    layers (PyramidKV, CAKE, KVzip's global threshold) or heads (AdaKV), or sets its own counts
    (DuoAttention's streaming heads; then ``sets_own_counts`` is True and the recipe needs no
    ratio). ``state`` is a dict private to one cache, for budgets that remember something.

    Protected candidates (``inputs.protected``) are kept on top of any budget: a budget shares out
    ``counts - protected`` and adds the protected count back.
    """

    kind = "budget"
    sets_own_counts: bool = False

    def allocate(
        self, ranking: torch.Tensor, inputs: ScoringInputs, counts: torch.Tensor, state: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(ranking [B, Hkv, L], counts [B, Hkv])`` for this layer."""
        return ranking, counts

    def across_layers(self, layers: list[LayerRanking], state: dict) -> None:
        """Called once every layer of the step is ranked; may change each layer's ``counts``.

        Only budgets that compare layers (CAKE, the global threshold) override this.
        """

    def head_profile(self, model_name: str) -> HeadProfile | None:
        """The head profile this budget reads for ``model_name`` (None: it reads none), so that a
        stored cache can name what it was computed with."""
        return None

    def observed_queries(self) -> int:
        """How many of the compressed forward's last queries ``allocate`` reads (0 = none)."""
        return 0

    def default_scorer(self) -> Scorer | None:
        """The scorer a recipe uses when it names this budget alone (``duo``), or None."""
        return None


def protected_counts(inputs: ScoringInputs) -> torch.Tensor:
    """``[B, Hkv]`` protected candidates per head (0 when the inputs carry no protection)."""
    if inputs.protected is None:
        return torch.zeros(inputs.keys.shape[:2], dtype=torch.long, device=inputs.keys.device)
    return (inputs.protected & inputs.valid).sum(-1)


def context_available(inputs: ScoringInputs) -> torch.Tensor:
    """``[B, Hkv]`` context tokens seen so far (``inputs.context_tokens``), or, for hand-built
    inputs without it, the valid unprotected candidates of each head."""
    if inputs.context_tokens is not None:
        return inputs.context_tokens[:, None].expand(inputs.keys.shape[:2]).long()
    return inputs.valid.sum(-1) - protected_counts(inputs)
