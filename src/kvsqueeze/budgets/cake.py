"""CAKE: layer budgets from each layer's attention dispersion and shift, managed in cascade."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.budgets.base import Budget, LayerRanking
from kvsqueeze.components import option
from kvsqueeze.scorers.base import ScoringInputs


def layer_preference(inputs: ScoringInputs, window: int, tau1: float, tau2: float) -> torch.Tensor:
    """``[B]`` preference score ``H ** (1 / tau1) * V ** (1 / tau2)`` of one layer.

    ``A`` is the attention of the last ``window`` queries (every query head) over the candidates
    before the window. Spatial dispersion ``H = -sum A log A`` (entropy, summed over heads and
    queries); temporal shift ``V = sum_j Var_i A[i, j]`` (variance over the window's queries,
    summed over heads and candidates). A layer whose attention is spread wide and moves from query
    to query needs more cache.
    """
    probs = inputs.attention(last=window)  # [B, Hkv, n_rep, w, L]
    first = inputs.query_slots[:, max(inputs.num_queries - window, 0)]
    before = inputs.valid & (inputs.slots < first[:, None, None])
    probs = probs * before[:, :, None, None, :]
    entropy = -(probs * torch.log(probs + 1e-10)).sum(dim=(1, 2, 3, 4))
    correction = 1 if probs.shape[3] > 1 else 0
    shift = probs.var(dim=3, correction=correction).sum(dim=(1, 2, 3))
    return entropy.clamp(min=0) ** (1 / tau1) * shift ** (1 / tau2)


def water_fill(
    prefs: torch.Tensor, low: torch.Tensor, high: torch.Tensor, total: torch.Tensor
) -> torch.Tensor:
    """Integer shares ``[B, n]`` proportional to ``prefs`` within ``[low, high]``, summing to
    ``total [B]`` (clamped to what the bounds allow): ``clamp(lam * pref, low, high)`` with the
    level ``lam`` found by bisection, then rounded by largest remainder."""
    prefs, low, high = prefs.double(), low.double(), high.double()
    total = torch.minimum(total.double(), high.sum(-1))
    low = torch.where((low.sum(-1) <= total)[:, None], low, torch.zeros_like(low))
    prefs = prefs / prefs.sum(-1, keepdim=True).clamp(min=1e-300)
    prefs = prefs.clamp(min=1e-9)  # a layer with no preference still fills once others are full
    lo = torch.zeros_like(total)
    hi = (high / prefs).amax(-1)
    for _ in range(100):
        mid = (lo + hi) / 2
        filled = torch.clamp(mid[:, None] * prefs, low, high).sum(-1)
        lo, hi = torch.where(filled < total, mid, lo), torch.where(filled < total, hi, mid)
    share = torch.clamp(hi[:, None] * prefs, low, high)
    whole = torch.minimum(torch.floor(share), high)
    missing = (total - whole.sum(-1)).round().long().clamp(min=0)  # [B]
    fraction = (share - whole).masked_fill(whole >= high, -1.0)
    order = torch.argsort(fraction, dim=-1, descending=True, stable=True)
    bonus = torch.zeros_like(whole)
    bonus.scatter_(-1, order, (torch.arange(whole.shape[-1]) < missing[:, None]).double())
    return (whole + bonus * (fraction >= 0)).long()


@dataclass
class CAKE(Budget):
    """Give each layer a share of the total cache proportional to its preference score.

    While a compression step ranks layer ``m``, it measures the layer's preference ``P_m``
    (``layer_preference``: entropy and variance of the observation window's attention). Once every
    layer is ranked, the total ``T`` (the uniform per-head budget times the number of layers
    compressed) is shared among them as the paper's ``B_l = P_l / sum(P) * T``, each layer capped
    by what it holds and given at least ``min(window, budget)`` tokens (``water_fill``). Every head
    of a layer keeps the same count; protected tokens are kept on top. With chunked prefill, each
    chunk re-allocates from its own window. CAKE's own eviction indicator (mean + variance of
    window attention) is not part of this budget: the recipe's scorer chooses the tokens.

    Parameters
    ----------
    window : observation window (last queries) the preferences are measured on.
    tau1, tau2 : temperatures of the dispersion and shift terms (paper tunes them per model).
    """

    name = "cake"
    citation = (
        "Qin et al., 2025. CAKE: Cascading and Adaptive KV Cache Eviction with Layer Preferences. "
        "arXiv:2503.12491"
    )

    window: int = option(32, minimum=1)
    # the preference raises entropies summed over heads and queries (thousands on real models) to
    # 1 / tau in float32: small taus overflow it and water_fill fails (0.05 does on a toy model);
    # 0.2 keeps 1 / tau <= 5, and the paper's tuned values are 0.4 to 2.3
    tau1: float = option(1.0, minimum=0.2)
    tau2: float = option(1.0, minimum=0.2)

    def observed_queries(self) -> int:
        return self.window

    def allocate(
        self, ranking: torch.Tensor, inputs: ScoringInputs, counts: torch.Tensor, state: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        state.setdefault("cake", {})[inputs.layer_idx] = layer_preference(
            inputs, self.window, self.tau1, self.tau2
        )
        return ranking, counts

    def across_layers(self, layers: list[LayerRanking], state: dict) -> None:
        preferences = state.pop("cake")
        protected = [layer.protected_counts for layer in layers]
        budgets = torch.stack(
            [
                (layer.counts - kept).clamp(min=0).amax(-1)
                for layer, kept in zip(layers, protected, strict=True)
            ],
            -1,
        )  # [B, layers]: each layer's uniform per-head budget
        caps = torch.stack([(layer.valid & ~layer.protected).sum(-1).amax(-1) for layer in layers], -1)
        prefs = torch.stack([preferences[layer.layer_idx] for layer in layers], -1)
        floor = torch.clamp(budgets.amax(-1), max=self.window)
        shares = water_fill(prefs, torch.minimum(caps, floor[:, None]), caps, budgets.sum(-1))
        for column, (layer, kept) in enumerate(zip(layers, protected, strict=True)):
            layer.counts = kept + shares[:, column, None]
