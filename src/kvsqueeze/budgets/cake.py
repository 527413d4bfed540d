"""CAKE: layer budgets from each layer's attention dispersion and shift, managed in cascade."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvsqueeze.budgets.base import Budget, protected_counts, ranking_by_slot, trim_layer, with_protection
from kvsqueeze.components import option
from kvsqueeze.scorers.base import ScoringInputs

if TYPE_CHECKING:
    from kvsqueeze.cache import CompressedLayer


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

    During a prefill forward, layer ``m`` measures its preference ``P_m`` (``layer_preference``:
    entropy and variance of the observation window's attention). The total ``T`` (uniform
    per-head budget times the number of layers) is then shared among layers ``0..m`` in
    proportion to ``P`` (capped by what each layer holds, at least ``min(window, budget)``
    tokens per layer), and the layers before ``m`` are trimmed again to their new, smaller
    share, with the per-token ranking they were selected with (kept for the forward, dropped
    after the last layer). So the cache never holds more than ``T`` after a layer, and after
    the last layer the allocation is the paper's ``B_l = P_l / sum(P) * T``. Every head of a
    layer keeps the same count; protected tokens are kept on top.

    Approximations: with chunked prefill, each chunk re-allocates from its own window, and the
    layers not yet reached by the chunk hold what the previous chunk gave them (reserved out of
    ``T``), so a layer trimmed early in a chunk cannot regrow if a later layer then frees room.
    CAKE's own eviction indicator (mean + variance of window attention) is not part of this
    budget: the recipe's scorer chooses the tokens.

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

    retrims = True
    reads_later_layers = True

    window: int = option(32, minimum=1)
    # the preference raises entropies summed over heads and queries (thousands on real models) to
    # 1 / tau in float32: small taus overflow it and water_fill fails (0.05 does on a toy model);
    # 0.2 keeps 1 / tau <= 5, and the paper's tuned values are 0.4 to 2.3
    tau1: float = option(1.0, minimum=0.2)
    tau2: float = option(1.0, minimum=0.2)

    def allocate(
        self, ranking: torch.Tensor, inputs: ScoringInputs, counts: torch.Tensor, state: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if inputs.layer_idx == 0 or "cake" not in state:
            state["cake"] = {"prefs": {}, "caps": {}, "protected": {}, "ranks": {}}
        run = state["cake"]
        layer = inputs.layer_idx
        protected = protected_counts(inputs)
        candidates = inputs.valid.sum(-1)
        run["budget"] = (counts - protected).clamp(min=0).amax(-1)  # [B] uniform per-head budget
        run["layers"] = inputs.num_layers
        run["prefs"][layer] = layer_preference(inputs, self.window, self.tau1, self.tau2)
        run["caps"][layer] = (candidates - protected).amax(-1)
        run["protected"][layer] = protected
        run["ranks"][layer] = ranking_by_slot(with_protection(ranking, inputs), inputs.slots)
        # keep every valid candidate for now; ``rebalance`` trims this layer with the earlier ones
        return ranking, candidates

    def rebalance(self, layers: Sequence[CompressedLayer], layer_idx: int, state: dict) -> None:
        run = state["cake"]
        done = sorted(run["prefs"])
        budget, num_layers = run["budget"], run["layers"]
        # layers this forward has not reached yet hold what the previous chunk left them
        later = range(layer_idx + 1, min(num_layers, len(layers)))
        reserved = sum((_held(layers[i]) for i in later), torch.zeros_like(budget))
        prefs = torch.stack([run["prefs"][i] for i in done], -1)
        high = torch.stack([run["caps"][i] for i in done], -1)
        low = torch.minimum(high, torch.minimum(budget, torch.full_like(budget, self.window))[:, None])
        shares = water_fill(prefs, low, high, (num_layers * budget - reserved).clamp(min=0))
        for column, index in enumerate(done):
            limit = run["protected"][index] + shares[:, column, None]
            if bool((_held(layers[index], per_head=True) > limit).any()):
                trim_layer(layers[index], run["ranks"][index], limit)
        run["shares"] = shares
        if layer_idx == num_layers - 1:
            run["ranks"].clear()  # rankings are only needed while the forward runs


def _held(layer: CompressedLayer, per_head: bool = False) -> torch.Tensor:
    """Tokens a layer holds: ``[B, Hkv]`` per head, or ``[B]`` (most in any head)."""
    if not layer.is_initialized:
        return torch.zeros((), dtype=torch.long)
    held = layer.held_lengths()
    return held if per_head else held.amax(-1)
