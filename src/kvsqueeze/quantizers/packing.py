"""Pure functions: asymmetric uniform quantization and bit packing (several codes per byte)."""

from __future__ import annotations

import torch

SCALE_DTYPE = torch.float16
"""Scales and minimums are stored in 16 bits, as in KIVI."""


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[..., D]`` integer codes in ``[0, 2**bits)`` into ``[..., D * bits / 8]`` uint8.

    Planar: with ``K = D * bits / 8`` bytes, byte ``k`` holds channels ``k, K + k, 2K + k, ...``,
    channel ``p * K + k`` in bits ``p*bits .. (p+1)*bits - 1``. Each plane unpacks into a
    contiguous run of channels, which vectorizes (the decode kernel reads codes this way).
    """
    per_byte = 8 // bits
    planes = codes.to(torch.uint8).reshape(*codes.shape[:-1], per_byte, -1)
    packed = planes[..., 0, :].clone()
    for plane in range(1, per_byte):
        packed |= planes[..., plane, :] << (plane * bits)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: ``[..., D * bits / 8]`` uint8 -> ``[..., D]`` uint8 codes.

    One shift by a number per plane (a shift by a broadcast tensor of shifts measured 10x slower
    on CPU)."""
    mask = (1 << bits) - 1
    planes = [(packed >> shift) & mask if shift else packed & mask for shift in range(0, 8, bits)]
    return torch.cat(planes, dim=-1)


def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization of ``x`` with one (scale, min) per slice along ``dim``.

    Returns ``(codes uint8, scale, minimum)``; scale and minimum keep ``dim`` with size 1 and are
    16-bit. ``dequantize(codes, scale, minimum)`` is within ``scale / 2`` of ``x`` (plus the
    16-bit rounding of scale and minimum).
    """
    levels = (1 << bits) - 1
    low = x.amin(dim=dim, keepdim=True).to(SCALE_DTYPE)
    high = x.amax(dim=dim, keepdim=True)
    scale = ((high - low.float()) / levels).to(SCALE_DTYPE)
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float))
    codes = torch.round((x.float() - low.float()) / safe).clamp_(0, levels).to(torch.uint8)
    return codes, scale, low


def dequantize(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """``codes * scale + minimum`` in float32 (scale/minimum broadcast over their size-1 dim)."""
    return torch.addcmul(minimum.float(), codes.float(), scale.float())
