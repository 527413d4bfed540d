"""Pure functions on ragged per-(batch, head) storage.

Storage at rest is *packed*: one tensor ``[N, *F]`` holding, head after head in (batch, head)
order, only the tokens each head keeps, plus ``lengths [B, H]``. When every head holds the same
number of tokens the packed tensor is exactly a dense ``[B, H, L, *F]`` tensor, and the functions
below take zero-copy fast paths.
"""

from __future__ import annotations

import torch


def is_uniform(lengths: torch.Tensor) -> bool:
    """True when every (batch, head) holds the same number of tokens."""
    return lengths.numel() == 0 or bool((lengths == lengths.flatten()[0]).all())


def _segment_layout(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each packed token: its segment id (flat batch*head index) and its index within it."""
    flat = lengths.flatten()
    segment = torch.repeat_interleave(torch.arange(flat.numel(), device=flat.device), flat)
    starts = torch.cumsum(flat, 0) - flat
    within = torch.arange(segment.numel(), device=flat.device) - starts[segment]
    return segment, within


def pad(packed: torch.Tensor, lengths: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
    """Packed ``[N, *F]`` -> left-aligned padded ``[B, H, Lmax, *F]`` (a view when uniform)."""
    batch, heads = lengths.shape
    feature = packed.shape[1:]
    if is_uniform(lengths):
        length = int(lengths.flatten()[0]) if lengths.numel() else 0
        return packed.view(batch, heads, length, *feature)
    longest = int(lengths.max())
    out = packed.new_full((batch * heads, longest, *feature), fill)
    segment, within = _segment_layout(lengths)
    out[segment, within] = packed
    return out.view(batch, heads, longest, *feature)


def occupancy(lengths: torch.Tensor, longest: int) -> torch.Tensor:
    """``[B, H, longest]`` bool: which entries of the padded view hold a stored token."""
    return torch.arange(longest, device=lengths.device) < lengths[..., None]


def pack(padded: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Padded ``[B, H, L, *F]`` and keep mask ``[B, H, L]`` -> packed ``[N, *F]`` (order preserved)."""
    if bool(keep.all()):
        return padded.reshape(-1, *padded.shape[3:]).clone()
    return padded[keep]


def append(packed: torch.Tensor, lengths: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Append ``new [B, H, q, *F]`` after each head's stored tokens; returns the new packed tensor.

    ``lengths`` are the lengths *before* the append; the caller adds ``q`` to them.
    """
    batch, heads, q_len = new.shape[:3]
    feature = new.shape[3:]
    if is_uniform(lengths):
        dense = pad(packed, lengths)
        return torch.cat([dense, new.to(packed.dtype)], dim=2).reshape(-1, *feature)
    flat = lengths.flatten()
    total = packed.shape[0] + batch * heads * q_len
    out = packed.new_empty((total, *feature))
    segment, _ = _segment_layout(lengths)
    # each earlier head grew by q tokens, so an old token moves by q per preceding head
    out[torch.arange(packed.shape[0], device=packed.device) + q_len * segment] = packed
    new_starts = torch.cumsum(flat + q_len, 0) - q_len
    dest = new_starts[:, None] + torch.arange(q_len, device=packed.device)
    out[dest.flatten()] = new.reshape(batch * heads * q_len, *feature).to(packed.dtype)
    return out
