"""MiniCache: adjacent deep layers share one direction per token, each keeping its magnitude."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvsqueeze.components import Component, option

PARALLEL = 1e-4
"""Below this angle (radians) two directions are interpolated linearly: SLERP's ``sin`` ratio is 0/0."""


@dataclass
class MiniCache(Component):
    """Merge the KV states of adjacent layers in the deeper part of the stack.

    Layers are paired from ``start`` of the depth down: ``(S, S+1), (S+2, S+3), ...`` with
    ``S = ceil(start * layers)``, full-attention layers only. For a token both layers of a pair hold
    (same batch row, KV head and slot, both still in 16-bit storage), keys and values are split into
    magnitude and direction; the two directions are interpolated on the sphere (SLERP, weight ``t``
    towards the deeper layer) and each layer restores its state as its own magnitude times the
    shared direction. The shallower layer (the host) stores that state in place of its own, plus
    the deeper layer's two magnitudes (16 bits each); the deeper layer drops its copy of the token
    and attends the host's, rescaled. A token whose two states are too far apart stays unmerged in
    both layers (the paper's retention): per head, with ``d`` the larger of the key and the value
    angular distance ``arccos(cos) / pi``, those with ``d > d_min + (d_max - d_min) * gamma`` over
    the head's candidates. What the host evicts later, the deeper layer loses too. Merging runs in
    the compression step of prefill forwards; tokens generated afterwards stay apart.

    Parameters
    ----------
    start : fraction of the depth where merging starts (the paper: the middle).
    t : SLERP weight of the deeper layer's direction (0: the host's direction, 1: the deeper's).
    gamma : retention threshold within each head's range of distances (1: merge every candidate).
    """

    name = "minicache"
    kind = "depth"
    citation = (
        "Liu et al., 2024. MiniCache: KV Cache Compression in Depth Dimension for Large Language "
        "Models. arXiv:2405.14366"
    )

    start: float = option(0.5, minimum=0.0, maximum=1.0)
    t: float = option(0.6, minimum=0.0, maximum=1.0)
    gamma: float = option(0.05, minimum=0.0, maximum=1.0)

    def pairs(self, windows: list[int | None]) -> dict[int, int]:
        """``{deeper layer: host layer}`` for a model whose layers have these sliding ``windows``
        (None: full attention); a pair is two adjacent full-attention layers."""
        first = math.ceil(self.start * len(windows))
        hosts = range(first, len(windows) - 1, 2)
        return {host + 1: host for host in hosts if windows[host] is None and windows[host + 1] is None}

    def merge(
        self,
        host: tuple[torch.Tensor, torch.Tensor],
        guest: tuple[torch.Tensor, torch.Tensor],
        candidates: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Merge aligned token pairs of two layers.

        ``host``/``guest`` are ``(keys, values)`` ``[B, H, L, D]`` of the shallower and the deeper
        layer, entry ``i`` of both being the same token; ``candidates [B, H, L]`` marks the pairs
        that may merge. Returns ``(host_keys, host_values, guest_key_norms, guest_value_norms,
        merged)``: the host's restored states (its magnitude times the shared direction; unmerged
        entries unchanged), the deeper layer's magnitudes ``[B, H, L]`` and ``merged [B, H, L]``.
        """
        distance = torch.maximum(angular_distance(host[0], guest[0]), angular_distance(host[1], guest[1]))
        nearest = distance.masked_fill(~candidates, math.inf).amin(-1, keepdim=True)
        furthest = distance.masked_fill(~candidates, -math.inf).amax(-1, keepdim=True)
        merged = candidates & (distance <= nearest + (furthest - nearest) * self.gamma)
        restored = []
        for own, other in zip(host, guest, strict=True):
            shared = slerp(F.normalize(own.float(), dim=-1), F.normalize(other.float(), dim=-1), self.t)
            state = own.float().norm(dim=-1, keepdim=True) * shared
            restored.append(torch.where(merged[..., None], state.to(own.dtype), own))
        return restored[0], restored[1], guest[0].float().norm(dim=-1), guest[1].float().norm(dim=-1), merged


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``arccos(cos(a, b)) / pi`` in [0, 1] over the last dimension."""
    cosine = F.cosine_similarity(a.float(), b.float(), dim=-1).clamp(-1.0, 1.0)
    return torch.arccos(cosine) / math.pi


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of unit vectors ``a`` and ``b`` at weight ``t`` towards ``b``."""
    omega = torch.arccos((a * b).sum(-1, keepdim=True).clamp(-1.0, 1.0))
    sine = torch.sin(omega)
    parallel = omega < PARALLEL
    safe = torch.where(parallel, 1.0, sine)
    spherical = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / safe
    return torch.where(parallel, F.normalize((1 - t) * a + t * b, dim=-1), spherical)
