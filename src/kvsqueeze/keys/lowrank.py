"""Low-rank keys: each encoded block's keys stored as rank-r factors (truncated SVD)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.components import option
from kvsqueeze.keys.base import KeyReducer
from kvsqueeze.quantizers.base import RESIDUAL_DTYPE


@dataclass
class LowRankKeys(KeyReducer):
    """Store each encoded block's keys ``K [T, D]`` as its best rank-``rank`` approximation
    ``U_r S_r V_r^T`` (truncated SVD): ``rank`` coefficients per token (``U_r S_r``, then
    quantized if the recipe has a quantizer) and a 16-bit basis ``V_r^T [rank, D]`` per block;
    values are untouched. Keys come back as ``coefficients @ basis`` when attention reads them.

    ShadowKV keeps a whole sequence's pre-RoPE keys as low-rank factors; the cache stores keys
    after RoPE, so the factors here are per block of ``group_size`` tokens of one head, which
    holds ``T * rank + rank * D`` numbers instead of ``T * D`` (a gain only when ``rank`` is well
    below both). The recent window keeps its exact keys.

    Parameters
    ----------
    rank : singular directions kept per block (a rank at least ``min(T, D)`` is exact).
    """

    name = "lowrank"
    citation = (
        "Sun et al., 2024. ShadowKV: KV Cache in Shadows for High-Throughput Long-Context LLM "
        "Inference. arXiv:2410.21465"
    )

    rank: int = option(8, minimum=1, maximum=256)

    def reduce(self, keys, head_state):
        tokens, dim = keys.shape[1:]
        rank = min(self.rank, tokens, dim)
        u, s, vh = torch.linalg.svd(keys.float(), full_matrices=False)
        return u[..., :rank] * s[:, None, :rank], {"key_basis": vh[:, :rank].to(RESIDUAL_DTYPE)}

    def restore(self, reduced, per_block, key_dim):
        return reduced.float() @ per_block["key_basis"].float()
