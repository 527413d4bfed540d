"""What a merging component does: fold the keys/values of evicted tokens into kept ones.

A merge runs in the compression step between select and keep (``kvsqueeze.compression``): it
reads the layer's view (slot order) and the keep mask, and returns new keys and values for the
kept entries that absorbed something; the layer writes those into its 16-bit storage and then
drops the evicted entries as usual, so a merge holds exactly the bytes of the same eviction.
"""

from __future__ import annotations

import torch

from kvsqueeze.components import Component


class Merger(Component):
    """Base class: ``merge`` maps one layer's view to merged keys/values of its kept entries."""

    kind = "merge"

    def merge(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        keep: torch.Tensor,
        dropped: torch.Tensor,
        into: torch.Tensor,
        scores: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Merge dropped entries into kept ones, per head.

        Parameters
        ----------
        keys, values : ``[B, H, L, D]`` the layer's tokens in slot order (``LayerView``).
        keep : ``[B, H, L]`` bool, the entries kept.
        dropped : ``[B, H, L]`` bool, evicted entries whose information may be merged (held and
            visible to the last query; never a kept one).
        into : ``[B, H, L]`` bool, kept entries that may absorb others (still in 16-bit storage).
        scores : ``[B, H, L]`` the ranking the entries were selected by (higher = more important).

        Returns
        -------
        ``(keys, values, absorbed)``: the input tensors with the entries ``absorbed [B, H, L]``
        replaced by their merged keys/values; every other entry is returned unchanged.
        """
        raise NotImplementedError


def absorb(
    keys: torch.Tensor,
    values: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    own_weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted averages of each target with the entries merged into it, per head.

    ``target [B, H, L]`` (long) is the entry each entry is merged into (``-1``: not merged),
    ``weight [B, H, L]`` its weight, ``own_weight [B, H, L]`` a target's weight for its own
    key/value. A target ``t`` becomes ``(own_weight[t] x[t] + sum_i weight[i] x[i]) /
    (own_weight[t] + sum_i weight[i])`` over the entries ``i`` with ``target[i] == t``, for keys
    and values alike. Returns ``(keys, values, absorbed)`` as ``Merger.merge`` does.
    """
    merged = target >= 0
    index = target.clamp(min=0)
    weight = torch.where(merged, weight.float(), 0.0)
    absorbed = torch.zeros_like(weight).scatter_add(2, index, merged.float()) > 0
    total = own_weight.float().scatter_add(2, index, weight)[..., None]
    out = []
    for tensor in (keys, values):
        x = tensor.float()
        summed = (own_weight.float()[..., None] * x).scatter_add(
            2, index[..., None].expand_as(x), weight[..., None] * x
        )
        out.append(torch.where(absorbed[..., None], (summed / total).to(tensor.dtype), tensor))
    return out[0], out[1], absorbed
