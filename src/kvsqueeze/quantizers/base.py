"""Quantizers store the older tokens of every head in packed low-bit form.

The cache keeps each head's most recent tokens (at least ``residual``) in 16-bit floats and
moves older ones, ``group_size`` at a time, into a ``QuantizedBody`` (see
``kvsqueeze.quantized_store``). A quantizer only encodes and decodes: it turns a block of tokens
into named per-token tensors (codes, per-token scales) and per-group tensors (per-channel
scales of a group of ``group_size`` consecutive tokens), and back.
"""

from __future__ import annotations

import torch

from kvsqueeze.components import Component

RESIDUAL_DTYPE = torch.float16
"""The full-precision window is kept in 16 bits, the precision of a 16-bit deployment."""


class Quantizer(Component):
    """Base class of packed KV quantizers. Subclasses are dataclasses with at least
    ``group_size`` and ``residual`` options."""

    kind = "quantizer"
    group_size: int = 32
    residual: int = 32
    demotes = False
    """True when tokens the scorer drops are kept in fewer bits instead (``mixed``)."""

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[dict, dict]:
        """``keys``/``values`` ``[M, D]`` (M a multiple of ``group_size``; consecutive groups of
        ``group_size`` rows belong to one head) -> ``(per_token, per_group)`` named tensors."""
        raise NotImplementedError

    def decode(
        self, per_token: dict, per_group: dict, group_sizes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of ``encode`` for the tokens still held: ``group_sizes [G]`` says how many
        tokens remain in each group (eviction removes rows). Returns float32 ``[N, D]`` x 2."""
        raise NotImplementedError
