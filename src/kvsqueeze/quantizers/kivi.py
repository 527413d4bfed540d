"""KIVI: keys quantized per channel, values per token, a full-precision window of recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.components import option
from kvsqueeze.quantizers.base import Quantizer
from kvsqueeze.quantizers.packing import dequantize, pack_codes, quantize, unpack_codes

CODE_BITS = (2, 4, 8)
"""Code widths that pack whole codes into a byte."""


@dataclass
class KIVI(Quantizer):
    """Asymmetric ``bits``-bit KV quantization with KIVI's grouping, codes packed 8/bits per byte.

    Keys: one (scale, min) per channel for each block of ``group_size`` consecutive tokens of a
    head (key outliers live in fixed channels). Values: one (scale, min) per token for each group
    of ``value_group_size`` channels. The ``residual`` most recent tokens of each head (and the
    open tail block) stay in 16-bit floats. Scales and minimums are 16-bit. Eviction drops a
    token's codes; its block keeps its scales, so eviction and quantization compose without
    re-quantizing.

    Parameters
    ----------
    bits : 2, 4 or 8.
    group_size : tokens per key group (the cache's block size), and channels per value group.
    residual : recent tokens per head kept in 16-bit floats besides the open tail block.
    value_group_size : channels per value group when it should differ from ``group_size``
        (0 = ``group_size``).
    """

    name = "kivi"
    block_format = "kivi"
    citation = (
        "Liu et al., 2024. KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache. arXiv:2402.02750"
    )

    bits: int = option(2, choices=CODE_BITS)
    # the cache's block size: beyond a few hundred tokens a block is mostly unfilled capacity
    group_size: int = option(32, minimum=1, maximum=256)
    residual: int = option(32, minimum=0)
    value_group_size: int = option(0, minimum=0)

    def _value_groups(self, dim: int) -> int:
        size = self.value_group_size or self.group_size
        return size if dim % size == 0 else dim

    def encode_blocks(self, keys: torch.Tensor, values: torch.Tensor, head_state=None) -> tuple[dict, dict]:
        blocks, tokens, _ = keys.shape
        key_codes, key_scale, key_min = quantize(keys, self.bits, dim=1)
        value_group = self._value_groups(values.shape[-1])
        grouped = values.reshape(blocks, tokens, -1, value_group)
        value_codes, value_scale, value_min = quantize(grouped, self.bits, dim=-1)
        per_token = {
            "key_codes": pack_codes(key_codes, self.bits),
            "value_codes": pack_codes(value_codes.reshape(blocks, tokens, -1), self.bits),
            "value_scale": value_scale.squeeze(-1),
            "value_min": value_min.squeeze(-1),
        }
        return per_token, {"key_scale": key_scale.squeeze(1), "key_min": key_min.squeeze(1)}

    def decode_blocks(self, per_token: dict, per_block: dict) -> tuple[torch.Tensor, torch.Tensor]:
        key_codes = unpack_codes(per_token["key_codes"], self.bits)
        keys = dequantize(key_codes, per_block["key_scale"][:, None], per_block["key_min"][:, None])
        value_codes = unpack_codes(per_token["value_codes"], self.bits)
        blocks, tokens, dim = value_codes.shape
        grouped = value_codes.reshape(blocks, tokens, -1, self._value_groups(dim))
        values = dequantize(grouped, per_token["value_scale"][..., None], per_token["value_min"][..., None])
        return keys, values.reshape(blocks, tokens, dim)


@dataclass
class KIVI2(KIVI):
    """KIVI at 2 bits (four codes per byte)."""

    name = "kivi2"
    bits: int = option(2, choices=CODE_BITS)


@dataclass
class KIVI4(KIVI):
    """KIVI at 4 bits (two codes per byte)."""

    name = "kivi4"
    bits: int = option(4, choices=CODE_BITS)
