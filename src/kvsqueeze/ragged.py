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


def select_rows(packed: torch.Tensor, lengths: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Packed tensor of batch rows ``index`` (any order, repeats allowed) of ``packed``."""
    padded = pad(packed, lengths)[index]
    return pack(padded, occupancy(lengths[index], padded.shape[2]))


def pack(padded: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Padded ``[B, H, L, *F]`` and keep mask ``[B, H, L]`` -> packed ``[N, *F]`` (order preserved)."""
    if bool(keep.all()):
        return padded.reshape(-1, *padded.shape[3:]).clone()
    return padded[keep]


def concat(
    first: torch.Tensor, first_lengths: torch.Tensor, second: torch.Tensor, second_lengths: torch.Tensor
):
    """Per head, ``first``'s tokens then ``second``'s: packed ``[N1 + N2, *F]`` in head order."""
    total = (first_lengths + second_lengths).flatten()
    starts = torch.cumsum(total, 0) - total
    out = first.new_empty((first.shape[0] + second.shape[0], *first.shape[1:]))
    segment, within = _segment_layout(first_lengths)
    out[starts[segment] + within] = first
    segment, within = _segment_layout(second_lengths)
    out[starts[segment] + first_lengths.flatten()[segment] + within] = second.to(first.dtype)
    return out


def split(
    packed: torch.Tensor, first_lengths: torch.Tensor, second_lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``concat``: per head, the first ``first_lengths`` tokens and the rest."""
    segment, within = _segment_layout(first_lengths + second_lengths)
    first = within < first_lengths.flatten()[segment]
    return packed[first], packed[~first]


def append(packed: torch.Tensor, lengths: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Append ``new [B, H, q, *F]`` after each head's stored tokens; returns the new packed tensor.

    ``lengths`` are the lengths *before* the append; the caller adds ``q`` to them.
    """
    batch, heads, q_len = new.shape[:3]
    feature = new.shape[3:]
    if is_uniform(lengths):
        dense = pad(packed, lengths)
        return torch.cat([dense, new.to(packed.dtype)], dim=2).reshape(-1, *feature)
    new_lengths = torch.full_like(lengths, q_len)
    return concat(packed, lengths, new.reshape(batch * heads * q_len, *feature), new_lengths)
