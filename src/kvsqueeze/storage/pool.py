"""``BlockPool``: fixed-size token blocks of one layer and one storage format.

A pool holds named fields whose first dimension indexes blocks: a per-token field is
``[capacity, block_size, *F]`` (keys, codes, slots), a per-block field ``[capacity, *F]`` (a
quantized block's per-channel scales, its fill count). Blocks are handed out by ``allocate`` and
returned by ``free``; a free block keeps its stale contents until it is handed out again. The pool
grows by a quarter at least (one copy of this pool, never of the whole cache; amortised O(1) per
appended token), so ids stay valid and every gather is a single index into each field. A tier
gives its slack back after eviction (``_Tier.release_slack``).
"""

from __future__ import annotations

import torch


class BlockPool:
    """Blocks of ``block_size`` tokens on ``device``; fields are added with ``add_field``."""

    def __init__(self, block_size: int, device: torch.device):
        self.block_size = block_size
        self.device = device
        self.fields: dict[str, torch.Tensor] = {}
        self._fills: dict[str, float] = {}
        self._free = torch.zeros(0, dtype=torch.long, device=device)
        self._free_count = 0
        self.capacity = 0

    @property
    def used(self) -> int:
        """Blocks handed out and not freed."""
        return self.capacity - self._free_count

    def add_field(self, name: str, per_block: tuple[int, ...], dtype: torch.dtype, fill: float = 0) -> None:
        """Add the field ``name`` of shape ``per_block`` per block (``(block_size, D)`` for a
        per-token field), filled with ``fill`` in every block, allocated or not."""
        if name in self.fields:
            return
        self.fields[name] = torch.full((self.capacity, *per_block), fill, dtype=dtype, device=self.device)
        self._fills[name] = fill

    def drop_field(self, name: str) -> None:
        self.fields.pop(name, None)
        self._fills.pop(name, None)

    def allocate(self, count: int) -> torch.Tensor:
        """``count`` free block ids (int64), growing the pool if needed."""
        if count > self._free_count:
            self._grow(max(self.capacity + self.capacity // 4, self.used + count, 4))
        start = self._free_count - count
        ids = self._free[start : self._free_count].flip(0)
        self._free_count = start
        return ids

    def free(self, ids: torch.Tensor) -> None:
        """Return blocks ``ids`` (each allocated, none twice) to the pool."""
        count = ids.numel()
        if count:
            self._free[self._free_count : self._free_count + count] = ids.flatten()
            self._free_count += count

    def _grow(self, capacity: int) -> None:
        for name, field in self.fields.items():
            grown = torch.full(
                (capacity, *field.shape[1:]), self._fills[name], dtype=field.dtype, device=self.device
            )
            grown[: self.capacity] = field
            self.fields[name] = grown
        new_ids = torch.arange(self.capacity, capacity, device=self.device)
        free = torch.empty(capacity, dtype=torch.long, device=self.device)
        free[: self._free_count] = self._free[: self._free_count]
        # the lowest new ids are handed out first (allocate takes from the top of the stack)
        free[self._free_count : self._free_count + new_ids.numel()] = new_ids.flip(0)
        self._free_count += new_ids.numel()
        self._free = free
        self.capacity = capacity

    def per_block_bytes(self, resize: dict[str, int] | None = None) -> int:
        """Bytes of one block over every field, computed from the field shapes (works when empty)."""
        resize = resize or {}
        total = 0
        for name, field in self.fields.items():
            per_block = 1
            for size in field.shape[1:]:
                per_block *= size
            total += per_block * resize.get(name, field.element_size())
        return total


class Workspace:
    """Scratch buffers that every layer's attention reuses within a forward: the keys and values
    it gathers from the blocks of one layer at a time. Reusing them spares allocating (and, for
    large ones, page-faulting) a fresh tensor per layer and step; they are transient working
    memory, reported by ``CompressedCache.nbytes_reserved``, not cache contents."""

    GROWTH = 1.25
    """A buffer grows with headroom, so a decode that adds a token per step rarely reallocates."""

    def __init__(self):
        self.buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def buffer(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A flat buffer of at least ``numel`` elements (contents undefined)."""
        key = (name, dtype, device)
        held = self.buffers.get(key)
        if held is None or held.numel() < numel:
            held = self.buffers[key] = torch.empty(int(numel * self.GROWTH), dtype=dtype, device=device)
        return held

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers.values())
