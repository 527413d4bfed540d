"""GEAR: quantized KV plus a low-rank and a sparse-outlier correction of the quantization error."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvsqueeze.components import option
from kvsqueeze.quantizers.kivi import CODE_BITS, KIVI
from kvsqueeze.quantizers.packing import SCALE_DTYPE


@dataclass
class GEAR(KIVI):
    """KIVI-grouped ``bits``-bit codes, corrected by outliers and a low-rank error term.

    Per token, the ``ceil(outliers * D)`` entries of largest magnitude are kept exactly (16-bit
    value + uint8 channel index) and left out of the quantization range (GEAR's sparse matrix,
    here with a fixed count per token so that evicting a token drops its rows). The remaining
    error of each group of ``group_size`` tokens is approximated by a rank-``rank`` SVD
    ``A @ B``: ``A`` has one 16-bit row per token, ``B`` is stored once per group. All of it is
    counted in ``nbytes``.

    Parameters
    ----------
    bits : code width (GEAR's near-lossless setting is 4).
    rank : rank of the error approximation per group (0 disables it).
    outliers : fraction of each token's channels kept exactly (0 disables them).
    group_size, residual : as in KIVI.
    """

    name = "gear"
    block_format = None  # outliers and low-rank corrections on top of the KIVI codes
    citation = (
        "Kang et al., 2024. GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless Generative "
        "Inference of LLM. arXiv:2403.05527"
    )

    bits: int = option(4, choices=CODE_BITS)
    rank: int = option(2, minimum=0)
    outliers: float = option(0.02, minimum=0, maximum=1)

    def _outlier_count(self, dim: int) -> int:
        return min(math.ceil(self.outliers * dim), dim) if self.outliers > 0 else 0

    def encode_blocks(self, keys: torch.Tensor, values: torch.Tensor, head_state=None) -> tuple[dict, dict]:
        filtered, per_token, per_block = {}, {}, {}
        for name, x in (("key", keys.float()), ("value", values.float())):
            count = self._outlier_count(x.shape[-1])
            index = x.abs().topk(count, dim=-1).indices if count else x.new_zeros(*x.shape[:2], 0).long()
            per_token[f"{name}_outlier_values"] = x.gather(-1, index).to(SCALE_DTYPE)
            per_token[f"{name}_outlier_index"] = index.to(torch.uint8)
            filtered[name] = x.scatter(-1, index, 0.0)
        codes, scales = super().encode_blocks(filtered["key"], filtered["value"])
        per_token.update(codes)
        per_block.update(scales)
        decoded = dict(zip(("key", "value"), super().decode_blocks(codes, scales), strict=True))
        for name in ("key", "value"):
            low_rank, basis = self._low_rank(filtered[name] - decoded[name])
            per_token[f"{name}_low_rank"], per_block[f"{name}_basis"] = low_rank, basis
        return per_token, per_block

    def _low_rank(self, error: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank-``rank`` SVD of each block's error ``[G, T, D]``: per-token rows ``[G, T, r]`` and
        a per-block basis ``[G, r * D]``."""
        blocks, tokens, dim = error.shape
        rank = min(self.rank, tokens, dim)
        u, s, vh = torch.linalg.svd(error, full_matrices=False)
        rows = u[..., :rank] * s[:, None, :rank]
        return rows.to(SCALE_DTYPE), vh[:, :rank].reshape(blocks, -1).to(SCALE_DTYPE)

    def decode_blocks(self, per_token: dict, per_block: dict) -> tuple[torch.Tensor, torch.Tensor]:
        decoded = super().decode_blocks(per_token, per_block)
        corrected = []
        for name, x in zip(("key", "value"), decoded, strict=True):
            rows = per_token[f"{name}_low_rank"].float()
            if rows.shape[-1]:
                basis = per_block[f"{name}_basis"].float().reshape(x.shape[0], rows.shape[-1], -1)
                x = x + rows @ basis
            index = per_token[f"{name}_outlier_index"].long()
            corrected.append(x.scatter(-1, index, per_token[f"{name}_outlier_values"].float()))
        return corrected[0], corrected[1]
