"""ThinK: prune the key channels the queries use least; only the kept channels are stored."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.components import option
from kvsqueeze.keys.base import KeyReducer


@dataclass
class ThinK(KeyReducer):
    """Keep, in each encoded block of each head, the ``channels`` share of key channels with the
    largest query-weighted magnitude; the others are not stored.

    Channel ``j`` of a block scores ``||Q[:, j]|| * ||K[:, j]||`` (ThinK's criterion, the norm of
    the ``j``-th term of ``Q K^T``): ``Q`` the last ``window`` queries of the forward that encoded
    the block (every query head sharing the KV head), ``K`` the block's keys. A block stores its
    kept channels (``[T, C]``, then quantized if the recipe has a quantizer) and their indices
    (one byte each); attention reads the pruned channels as zeros, which is the paper's
    ``q' K'^T`` over the kept channels. The paper chooses channels once per head over the whole
    prompt; here each block chooses for itself, and tokens generated later are pruned the same
    way once they leave the recent window (the paper keeps them whole).

    Parameters
    ----------
    channels : fraction of key channels kept, in (0, 1].
    window : last queries of a forward whose magnitudes weigh the channels.
    """

    name = "think"
    citation = "Xu et al., 2024. ThinK: Thinner Key Cache by Query-Driven Pruning. arXiv:2407.21018"
    needs_queries = True

    channels: float = option(0.5, minimum=0.01, maximum=1.0)
    window: int = option(32, minimum=1)

    def observed_queries(self) -> int:
        return self.window

    def kept_channels(self, key_dim: int) -> int:
        return max(1, round(self.channels * key_dim))

    def initial_head_state(self, batch: int, heads: int, key_dim: int, device) -> dict[str, torch.Tensor]:
        # before any forward is observed, channels are weighed by the keys alone
        return {"query_norms": torch.ones(batch, heads, key_dim, device=device)}

    def observe(self, queries: torch.Tensor, kv_heads: int) -> dict[str, torch.Tensor]:
        batch, q_heads, window, dim = queries.shape
        grouped = queries.float().reshape(batch, kv_heads, q_heads // kv_heads * window, dim)
        return {"query_norms": grouped.square().sum(2).sqrt()}

    def reduce(self, keys, head_state):
        dim = keys.shape[-1]
        weights = head_state.get("query_norms")
        scores = keys.float().square().sum(1).sqrt()
        if weights is not None:
            scores = scores * weights.to(scores.device)
        kept = scores.topk(self.kept_channels(dim), dim=-1).indices.sort(-1).values
        reduced = keys.gather(-1, kept[:, None, :].expand(-1, keys.shape[1], -1))
        index_dtype = torch.uint8 if dim <= 256 else torch.int16
        return reduced, {"key_channels": kept.to(index_dtype)}

    def restore(self, reduced, per_block, key_dim):
        kept = per_block["key_channels"].long()
        blocks, tokens, _ = reduced.shape
        keys = torch.zeros(blocks, tokens, key_dim, device=reduced.device)
        return keys.scatter(-1, kept[:, None, :].expand(-1, tokens, -1), reduced.float())
