"""Quantizers store the older tokens of every head in packed low-bit form, one block at a time.

The cache keeps each head's most recent tokens (the open tail block plus at least ``residual``
tokens) in 16-bit floats; a block of ``group_size`` tokens that has filled and has ``residual``
newer tokens after it is encoded once into a quantized block (see ``kvsqueeze.storage``). A
quantizer only encodes and decodes blocks: it turns ``G`` blocks of tokens into named per-token
tensors (codes, per-token scales) and per-block tensors (per-channel scales of the block), and
back.
"""

from __future__ import annotations

import torch

from kvsqueeze.components import Component

RESIDUAL_DTYPE = torch.float16
"""The full-precision window is kept in 16 bits, the precision of a 16-bit deployment."""


class Quantizer(Component):
    """Base class of packed KV quantizers. Subclasses are dataclasses with at least
    ``group_size`` (tokens per block) and ``residual`` options."""

    kind = "quantizer"
    group_size: int = 32
    residual: int = 32
    demotes = False
    """True when tokens the scorer drops are kept in fewer bits instead (``mixed``)."""
    block_format: str | None = None
    """The layout of its encoded blocks, if the compiled decode kernel reads it (``"kivi"``)."""

    def tiers(self) -> list[Quantizer]:
        """The quantizers of the layer's quantized tiers: the demotion tier first, the tier full
        blocks age into last (one tier for all but ``mixed``)."""
        return [self]

    def initial_head_state(self, batch: int, heads: int, key_dim: int, device) -> dict[str, torch.Tensor]:
        """Per-head tensors ``[B, H, ...]`` the codec reads when it encodes (none for quantizers;
        a key reducer's, e.g. ThinK's query magnitudes, through ``ReducedKeys``)."""
        return {}

    def encode_blocks(
        self, keys: torch.Tensor, values: torch.Tensor, head_state: dict[str, torch.Tensor] | None = None
    ) -> tuple[dict, dict]:
        """``keys``/``values`` ``[G, group_size, D]`` (one block of one head each; ``head_state``
        the per-head tensors of each block's head, ``[G, ...]``) -> ``(per_token, per_block)``:
        named tensors ``[G, group_size, ...]`` and ``[G, ...]``."""
        raise NotImplementedError

    def decode_blocks(self, per_token: dict, per_block: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of ``encode_blocks``: float32 keys and values ``[G, group_size, D]``. Entries of
        a block that no longer hold a token (evicted) decode to whatever their codes say."""
        raise NotImplementedError
