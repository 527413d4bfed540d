"""Key reducers store each encoded block's keys in fewer numbers than ``tokens x head_dim``.

A reducer turns a block's keys ``[G, T, D]`` into a smaller per-token tensor ``[G, T, C]`` plus
per-block side information (which channels were kept, a low-rank basis), and back. It does not
choose tokens and it composes with a quantizer: ``ReducedKeys`` wraps the layer's block codec
(the recipe's quantizer, or ``PlainBlocks`` without one) so that the quantizer encodes the
reduced keys and the values. Blocks are encoded as KIVI's are: once a block of ``group_size``
tokens has ``residual`` newer tokens after it, so the most recent tokens keep every channel.
"""

from __future__ import annotations

import torch

from kvsqueeze.components import Component
from kvsqueeze.quantizers.base import RESIDUAL_DTYPE, Quantizer

PLAIN_GROUP = 32
"""Tokens per encoded block of a recipe with a key reducer and no quantizer."""

PLAIN_RESIDUAL = 32
"""Recent tokens per head such a recipe keeps with every key channel (besides the open block)."""


class KeyReducer(Component):
    """Base of key reducers (``think``, ``lowrank``): a recipe's ``keys`` component."""

    kind = "keys"
    needs_queries = False
    """Whether ``observe`` reads the queries of every compressed forward."""

    def observed_queries(self) -> int:
        """How many of a forward's last queries ``observe`` reads."""
        return 0

    def initial_head_state(self, batch: int, heads: int, key_dim: int, device) -> dict[str, torch.Tensor]:
        """Per-head tensors ``[B, H, ...]`` the reducer reads when it encodes (before any forward)."""
        return {}

    def observe(self, queries: torch.Tensor, kv_heads: int) -> dict[str, torch.Tensor]:
        """The per-head state read from a forward's last queries ``[B, Hq, w, D]``."""
        return {}

    def reduce(
        self, keys: torch.Tensor, head_state: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``keys [G, T, D]`` (one block of one head each; ``head_state`` gathered per block)
        -> reduced keys ``[G, T, C]`` and per-block tensors ``[G, ...]``."""
        raise NotImplementedError

    def restore(
        self, reduced: torch.Tensor, per_block: dict[str, torch.Tensor], key_dim: int
    ) -> torch.Tensor:
        """float32 keys ``[G, T, key_dim]`` from ``reduce``'s output."""
        raise NotImplementedError


class PlainBlocks(Quantizer):
    """Keys and values of a block as they are, in 16 bits: the inner codec of a key reducer
    used without a quantizer."""

    name = "plain"
    group_size = PLAIN_GROUP
    residual = PLAIN_RESIDUAL

    def encode_blocks(self, keys, values, head_state=None):
        return {"keys16": keys.to(RESIDUAL_DTYPE), "values16": values.to(RESIDUAL_DTYPE)}, {}

    def decode_blocks(self, per_token, per_block):
        return per_token["keys16"].float(), per_token["values16"].float()


class ReducedKeys:
    """A block codec for keys of ``key_dim`` channels: ``reducer`` shrinks the keys, then
    ``inner`` encodes them with the values (the quantizer's grouping and window are the layer's)."""

    block_format = None
    demotes = False

    def __init__(self, reducer: KeyReducer, inner: Quantizer, key_dim: int):
        self.reducer, self.inner, self.key_dim = reducer, inner, key_dim
        self.group_size, self.residual = inner.group_size, inner.residual

    def initial_head_state(self, batch: int, heads: int, key_dim: int, device) -> dict[str, torch.Tensor]:
        return self.reducer.initial_head_state(batch, heads, key_dim, device)

    def encode_blocks(self, keys, values, head_state=None):
        reduced, side = self.reducer.reduce(keys, head_state or {})
        per_token, per_block = self.inner.encode_blocks(reduced, values)
        return per_token, {**per_block, **side}

    def decode_blocks(self, per_token, per_block):
        reduced, values = self.inner.decode_blocks(per_token, per_block)
        return self.reducer.restore(reduced, per_block, self.key_dim), values
