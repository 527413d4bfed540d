"""Per-(row, KV head) block tables over a ``BlockPool``: a dense tier and quantized tiers.

Both tiers keep ``table [B, H, W]`` (block ids, head by head, in order; columns past a head's
blocks are unused) and ``count [B, H]`` (tokens held). A per-token field of a tier is read
through the *positions* of its tokens: ``block_id * block_size + index_in_block``, an index into
the field viewed as ``[capacity * block_size, *F]``.

- ``DenseTier``: tokens in a float dtype; every block of a head is full but its last, so
  appending writes into the tail block (nothing stored moves) and eviction compacts a head's kept
  tokens to the front of its blocks, freeing the blocks left empty.
- ``QuantizedTier``: blocks encoded by a ``Quantizer`` (codes + scales). A block's ``fill`` says
  how many tokens it still holds at its first positions: evicting compacts within the block and
  never re-encodes it; a block left empty is freed.

``export``/``load`` turn a tier into plain tensors holding only the blocks in use (and back):
the form used to save, stack, split and select batch rows.
"""

from __future__ import annotations

import math

import torch

from kvsqueeze.quantizers.base import Quantizer
from kvsqueeze.storage.pool import BlockPool

GUEST_NORMS = ("guest_key_norm", "guest_value_norm")
"""Per-token fields of a layer that holds a deeper layer's merged tokens (``minicache``): that
layer's key and value magnitudes, 0 where the token is not shared."""

CARRIED_FIELDS = ("slots", "scores", *GUEST_NORMS)
"""Per-token fields the layer attaches to every token of every tier, once it needs them: the
token's slot (after eviction), a stateful scorer's running score and a deeper layer's magnitudes."""


def ceil_div(x, y):
    return -(-x // y)


def gather_blocks(field: torch.Tensor, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Blocks ``ids [...]`` of a pool field ``[capacity, *F]``: ``[*ids.shape, *F]``.

    ``index_select`` on the field flattened per block, which copies whole blocks at memory speed
    (advanced indexing ``field[ids]`` measured 3-5x slower on CPU); ``out`` (a flat buffer of at
    least that many elements) saves allocating the result, e.g. a large one at every decode step.
    """
    flat = field.view(field.shape[0], math.prod(field.shape[1:]))
    index = ids.reshape(-1)
    if out is None:
        picked = torch.index_select(flat, 0, index)
    else:
        picked = torch.index_select(
            flat, 0, index, out=out[: index.numel() * flat.shape[1]].view(-1, flat.shape[1])
        )
    return picked.view(*ids.shape, *field.shape[1:])


def _within(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``counts [N]`` items per segment: each item's segment and its index within it."""
    segment = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    return segment, torch.arange(segment.numel(), device=counts.device) - starts[segment]


class _Tier:
    """What both tiers share: the pool, the table and the per-token field moves."""

    def __init__(self, pool: BlockPool, batch: int, heads: int):
        self.pool = pool
        device = pool.device
        self.table = torch.zeros(batch, heads, 0, dtype=torch.long, device=device)
        self.count = torch.zeros(batch, heads, dtype=torch.long, device=device)
        self.token_fields: list[str] = []
        """Names of the per-token fields (``[capacity, block_size, *F]``), moved with their token."""

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    def _reserve_columns(self, width: int) -> None:
        """Widen the table to ``width`` columns (tables are as wide as the longest head needs)."""
        if self.table.shape[2] < width:
            self.table = torch.nn.functional.pad(self.table, (0, width - self.table.shape[2]))

    def _trim_columns(self) -> None:
        """Narrow the table to the blocks of its longest head, after tokens left."""
        blocks = self.blocks_held()
        self.table = self.table[:, :, : int(blocks.max()) if blocks.numel() else 0].contiguous()

    def _flat(self, name: str) -> torch.Tensor:
        field = self.pool.fields[name]
        return field.view(-1, *field.shape[2:])

    def write(self, name: str, positions: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``values [..., *F]`` at token ``positions [...]`` of field ``name``."""
        flat = self._flat(name)
        flat[positions.flatten()] = values.reshape(-1, *flat.shape[1:]).to(flat.dtype)

    def read(self, name: str, positions: torch.Tensor) -> torch.Tensor:
        """Field ``name`` at token ``positions [...]``: ``[..., *F]``."""
        flat = self._flat(name)
        return flat[positions.flatten()].view(*positions.shape, *flat.shape[1:])

    def move_tokens(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Copy every per-token field from positions ``source [N]`` to ``target [N]``."""
        for name in self.token_fields:
            flat = self._flat(name)
            flat[target] = flat[source]

    def add_token_field(
        self, name: str, per_token: tuple[int, ...], dtype: torch.dtype, fill: float = 0
    ) -> None:
        """Add the per-token field ``name`` of shape ``per_token`` (no-op if it exists)."""
        if name not in self.token_fields:
            self.pool.add_field(name, (self.block_size, *per_token), dtype, fill)
            self.token_fields.append(name)

    def blocks_held(self) -> torch.Tensor:
        """``[B, H]`` blocks in each head's table."""
        raise NotImplementedError

    def per_head(self) -> dict[str, torch.Tensor]:
        """The per-head tensors besides the table (``count``, ...), by name."""
        return {"count": self.count}

    def bookkeeping(self) -> list[torch.Tensor]:
        """The tensors besides the blocks (counted in a layer's bytes)."""
        return [self.table, *self.per_head().values()]

    def export(self, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The blocks in use (of batch ``rows`` only, any order, repeats allowed), renumbered
        ``0..n-1`` in table order: every pool field restricted to them (``token.<name>`` /
        ``block.<name>``), the renumbered ``table`` (``-1`` where unused) and the per-head tensors."""
        table, blocks, per_head = self.table, self.blocks_held(), self.per_head()
        if rows is not None:
            table, blocks = table[rows], blocks[rows]
            per_head = {name: t[rows] for name, t in per_head.items()}
        width = int(blocks.max()) if blocks.numel() else 0
        table = table[:, :, :width]
        used = torch.arange(width, device=table.device) < blocks[..., None]
        ids = table[used]
        renumbered = torch.full_like(table, -1)
        renumbered[used] = torch.arange(ids.numel(), device=table.device)
        exported = {
            f"{'token' if name in self.token_fields else 'block'}.{name}": gather_blocks(field, ids)
            for name, field in self.pool.fields.items()
        }
        exported["table"] = renumbered
        exported.update({name: t.clone() for name, t in per_head.items()})
        return exported

    def release_slack(self) -> None:
        """Give free blocks back when they are more than a sixteenth of those in use (after an
        eviction): the blocks in use move to a pool of exactly their size."""
        pool = self.pool
        if pool.capacity - pool.used > max(pool.used // 16, 8):
            self.load(self.export(), copy=False)

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (any order, repeats allowed); every row gets its own copy of
        its blocks, so no two rows share one."""
        self.load(self.export(rows=index), copy=False)

    def load(self, exported: dict[str, torch.Tensor], copy: bool = True) -> None:
        """Take the blocks of ``export()`` (or of several, stacked) as this tier's whole pool;
        ``copy=False`` when nobody else holds ``exported`` (one of our own exports)."""
        pool = self.pool
        fields = {}
        self.token_fields = []
        for key, t in exported.items():
            kind, _, name = key.partition(".")
            if kind in ("token", "block"):
                fields[name] = t.clone() if copy else t
                if kind == "token":
                    self.token_fields.append(name)
        pool.fields = fields
        pool._fills = {name: pool._fills.get(name, 0) for name in fields}
        pool.capacity = next(iter(fields.values())).shape[0] if fields else 0
        pool._free = torch.zeros(pool.capacity, dtype=torch.long, device=pool.device)
        pool._free_count = 0
        self.table = exported["table"].clamp(min=0)
        self.count = exported["count"].clone()


class DenseTier(_Tier):
    """Tokens in ``dtype``, ``count[b, h]`` of them in ``table[b, h, :ceil(count / block_size)]``."""

    def __init__(self, batch: int, heads: int, block_size: int, key_dim: int, value_dim: int, dtype, device):
        super().__init__(BlockPool(block_size, device), batch, heads)
        self.add_token_field("keys", (key_dim,), dtype)
        self.add_token_field("values", (value_dim,), dtype)
        self.longest = 0
        self.uniform = True

    def blocks_held(self) -> torch.Tensor:
        return ceil_div(self.count, self.block_size)

    def _refresh(self) -> None:
        """Recompute the host-side ``longest`` / ``uniform`` after ``count`` changed."""
        self.longest = int(self.count.max()) if self.count.numel() else 0
        self.uniform = bool((self.count == self.longest).all())

    def append(self, fields: dict[str, torch.Tensor]) -> None:
        """Append ``q`` tokens to every head: ``fields[name]`` is ``[B, H, q, *F]`` for each
        per-token field of the pool (``keys``, ``values``, and ``slots``/``scores`` if held)."""
        batch, heads, q = fields["keys"].shape[:3]
        size, device = self.block_size, self.table.device
        if self.uniform:
            start = self.longest
            first, last = ceil_div(start, size), ceil_div(start + q, size)
            if last > first:
                self._reserve_columns(last)
                self.table[:, :, first:last] = self.pool.allocate(batch * heads * (last - first)).view(
                    batch, heads, -1
                )
            if q == 1:  # a decode step: one block and one offset per head
                blocks, offsets = self.table[:, :, start // size, None], start % size
            else:
                index = torch.arange(start, start + q, device=device)
                blocks, offsets = self.table[:, :, index // size], index % size
        else:
            index = self.count[..., None] + torch.arange(q, device=device)
            before, after = ceil_div(self.count, size), ceil_div(self.count + q, size)
            new_blocks = (after - before).flatten()
            self._reserve_columns(ceil_div(self.longest + q, size))
            total = int(new_blocks.sum())
            if total:
                head, nth = _within(new_blocks)
                self.table.view(batch * heads, -1)[head, before.flatten()[head] + nth] = self.pool.allocate(
                    total
                )
            blocks, offsets = self.table.gather(2, index // size), index % size
        for name, values in fields.items():
            field = self.pool.fields[name]
            field[blocks, offsets] = values if values.dtype == field.dtype else values.to(field.dtype)
        self.count.add_(q)  # in place: a decode step allocates nothing it does not store
        self.longest += q

    def positions(self) -> torch.Tensor:
        """``[B, H, longest]`` position of each head's tokens (entries past ``count`` are junk)."""
        index = torch.arange(self.longest, device=self.table.device)
        return self.table[:, :, index // self.block_size] * self.block_size + index % self.block_size

    def gather(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, H, longest, *F]`` field ``name`` of each head's tokens, one index per block
        (``out``: see ``gather_blocks``)."""
        field = self.pool.fields[name]
        width = ceil_div(self.longest, self.block_size)
        blocks = gather_blocks(field, self.table[:, :, :width], out)
        batch, heads = self.count.shape
        return blocks.view(batch, heads, width * self.block_size, *field.shape[2:])[:, :, : self.longest]

    def held(self) -> torch.Tensor:
        """``[B, H, longest]`` bool: which gathered entries hold a token."""
        return torch.arange(self.longest, device=self.count.device) < self.count[..., None]

    def keep(self, keep: torch.Tensor) -> None:
        """Keep the tokens where ``keep [B, H, longest]`` is True, in order, and free the blocks
        left empty."""
        size = self.block_size
        kept = keep & self.held()
        new_count = kept.sum(-1)
        target = kept.cumsum(-1) - 1
        target_positions = self.table.gather(2, target.clamp(min=0) // size) * size + target % size
        self.move_tokens(self.positions()[kept], target_positions[kept])
        columns = torch.arange(self.table.shape[2], device=self.table.device)
        emptied = (columns >= ceil_div(new_count, size)[..., None]) & (
            columns < self.blocks_held()[..., None]
        )
        self.pool.free(self.table[emptied])
        self.count = new_count
        self._refresh()
        self._trim_columns()

    def drop_front(self, blocks: int | torch.Tensor) -> None:
        """Free the first ``blocks`` blocks of every head (a number, or ``[B, H]`` per head); each
        is full (a sliding window moved past it, or it was encoded into a quantized tier)."""
        size = self.block_size
        if isinstance(blocks, int):
            if blocks <= 0:
                return
            self.pool.free(self.table[:, :, :blocks])
            self.table = self.table[:, :, blocks:].contiguous()
            self.count = self.count - blocks * size
            self.longest -= blocks * size
            return
        columns = torch.arange(self.table.shape[2], device=self.table.device)
        self.pool.free(self.table[columns < blocks[..., None]])
        shifted = (columns + blocks[..., None]).clamp(max=max(self.table.shape[2] - 1, 0))
        self.table = self.table.gather(2, shifted)
        self.count = self.count - blocks * size
        self._refresh()
        self._trim_columns()

    def truncate(self, remove: int) -> None:
        """Forget the last ``remove`` tokens of every head (each holds at least that many)."""
        kept = self.count - remove
        columns = torch.arange(self.table.shape[2], device=self.table.device)
        emptied = (columns >= ceil_div(kept, self.block_size)[..., None]) & (
            columns < self.blocks_held()[..., None]
        )
        self.pool.free(self.table[emptied])
        self.count = kept
        self.longest -= remove
        self._trim_columns()

    def load(self, exported: dict[str, torch.Tensor], copy: bool = True) -> None:
        super().load(exported, copy)
        self._refresh()


class QuantizedTier(_Tier):
    """Blocks encoded by ``quantizer``: ``blocks[b, h]`` of them per head; each block keeps its
    ``fill`` tokens at its first positions."""

    def __init__(self, quantizer: Quantizer, batch: int, heads: int, key_dim: int, device):
        pool = BlockPool(quantizer.group_size, device)
        pool.add_field("fill", (), torch.long)
        super().__init__(pool, batch, heads)
        self.quantizer = quantizer
        self.blocks = torch.zeros(batch, heads, dtype=torch.long, device=device)
        self.widest = 0
        self.block_fields: list[str] = []
        """The quantizer's per-block fields (``[capacity, *F]``), e.g. per-channel key scales."""
        self.head_state = quantizer.initial_head_state(batch, heads, key_dim, device)
        """What the codec reads per head when it encodes (``Quantizer.initial_head_state``)."""

    def blocks_held(self) -> torch.Tensor:
        return self.blocks

    def per_head(self) -> dict[str, torch.Tensor]:
        return {"count": self.count, "blocks": self.blocks, **self.head_state}

    def add(self, fields: dict[str, torch.Tensor], counts: torch.Tensor) -> None:
        """Encode ``counts[b, h]`` tokens per head into new blocks after each head's blocks.

        ``fields[name]`` is packed head after head, ``[N, *F]``: ``keys``/``values`` (exact
        values) and the other per-token fields to carry (``slots``, ``scores``). A head's last
        block may be short: its free positions are filled with copies of its first token, so the
        block's per-channel ranges are those of its own tokens.
        """
        size = self.block_size
        per_head = ceil_div(counts, size).flatten()
        head, nth = _within(per_head)
        starts = (torch.cumsum(counts.flatten(), 0) - counts.flatten())[head] + nth * size
        sizes = torch.clamp(counts.flatten()[head] - nth * size, max=size)
        offset = torch.arange(size, device=counts.device)
        index = torch.where(offset < sizes[:, None], starts[:, None] + offset, starts[:, None])
        head_state = {name: t.flatten(0, 1)[head] for name, t in self.head_state.items()}
        per_token, per_block = self.quantizer.encode_blocks(
            fields["keys"][index].float(), fields["values"][index].float(), head_state
        )
        ids = self.pool.allocate(index.shape[0])
        for name, t in per_block.items():
            if name not in self.block_fields:
                self.pool.add_field(name, t.shape[1:], t.dtype)
                self.block_fields.append(name)
            self.pool.fields[name][ids] = t
        carried = {name: t[index] for name, t in fields.items() if name in CARRIED_FIELDS}
        for name, t in {**per_token, **carried}.items():
            self.add_token_field(name, t.shape[2:], t.dtype)
            self.pool.fields[name][ids] = t
        self.pool.fields["fill"][ids] = sizes
        batch, heads = counts.shape
        self._reserve_columns(int((self.blocks + ceil_div(counts, size)).max()))
        self.table.view(batch * heads, -1)[head, self.blocks.flatten()[head] + nth] = ids
        self.blocks = self.blocks + ceil_div(counts, size)
        self.count = self.count + counts
        self.widest = int(self.blocks.max()) if self.blocks.numel() else 0

    def block_ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, H, widest]`` block ids and ``[B, H, widest, block_size]`` bool of held tokens."""
        ids = self.table[:, :, : self.widest]
        in_table = torch.arange(self.widest, device=ids.device) < self.blocks[..., None]
        fill = torch.where(in_table, self.pool.fields["fill"][ids], 0)
        return ids, torch.arange(self.block_size, device=ids.device) < fill[..., None]

    def positions(self) -> torch.Tensor:
        """``[B, H, widest * block_size]`` position of every entry of each head's blocks."""
        ids, _ = self.block_ids()
        entries = ids[..., None] * self.block_size + torch.arange(self.block_size, device=ids.device)
        return entries.flatten(2)

    def held(self) -> torch.Tensor:
        return self.block_ids()[1].flatten(2)

    def gather(self, name: str) -> torch.Tensor:
        """``[B, H, widest * block_size, *F]`` per-token field ``name`` of every block entry."""
        return self.read(name, self.positions())

    def decode(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 keys and values ``[B, H, widest * block_size, D]`` of every block entry."""
        ids, _ = self.block_ids()
        batch, heads, width = ids.shape
        flat = ids.flatten()
        fields = self.pool.fields
        codes = [name for name in self.token_fields if name not in CARRIED_FIELDS]
        per_token = {name: gather_blocks(fields[name], flat) for name in codes}
        per_block = {name: gather_blocks(fields[name], flat) for name in self.block_fields}
        keys, values = self.quantizer.decode_blocks(per_token, per_block)
        return (
            keys.view(batch, heads, width * self.block_size, -1),
            values.view(batch, heads, width * self.block_size, -1),
        )

    def keep(self, keep: torch.Tensor) -> None:
        """Keep the entries where ``keep [B, H, widest * block_size]`` is True: survivors move to
        the front of their block (codes and scales unchanged); emptied blocks are freed."""
        ids, held = self.block_ids()
        size = self.block_size
        kept = keep.view(held.shape) & held
        fill = kept.sum(-1)
        entries = ids[..., None] * size + torch.arange(size, device=ids.device)
        target = ids[..., None] * size + kept.cumsum(-1) - 1
        self.move_tokens(entries[kept], target[kept])
        in_table = torch.arange(self.widest, device=ids.device) < self.blocks[..., None]
        self.pool.fields["fill"][ids[in_table]] = fill[in_table]
        alive = in_table & (fill > 0)
        self.pool.free(ids[in_table & ~alive])
        order = torch.argsort((~alive).to(torch.int8), dim=-1, stable=True)
        self.table[:, :, : self.widest] = ids.gather(2, order)
        self.blocks = alive.sum(-1)
        self.count = fill.sum(-1)
        self.widest = int(self.blocks.max()) if self.blocks.numel() else 0
        self._trim_columns()

    def load(self, exported: dict[str, torch.Tensor], copy: bool = True) -> None:
        super().load(exported, copy)
        self.block_fields = [key.partition(".")[2] for key in exported if key.startswith("block.")]
        self.block_fields.remove("fill")
        self.blocks = exported["blocks"].clone()
        self.head_state = {name: exported[name].clone() for name in self.head_state}
        self.widest = int(self.blocks.max()) if self.blocks.numel() else 0


def concat_exports(exports: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The exports of one tier of several caches as one batch, rows one after another.

    Block ids are renumbered; a field one export lacks (a carried field, e.g. ``scores``, in a
    cache never compressed, or a quantizer's codes in a tier that holds no block yet) is filled
    with its default for that export's blocks.
    """
    fields = {}
    for exported in exports:
        for key, t in exported.items():
            if "." in key:
                fields.setdefault(key, t)
    fills = {"token.slots": -1}
    out: dict[str, list[torch.Tensor]] = {key: [] for key in fields}
    tables, offset = [], 0
    width = max(exported["table"].shape[2] for exported in exports)
    for exported in exports:
        count = max((t.shape[0] for key, t in exported.items() if "." in key), default=0)
        for key, template in fields.items():
            held = exported.get(key)
            if held is None:
                held = template.new_full((count, *template.shape[1:]), fills.get(key, 0))
            out[key].append(held)
        table = exported["table"]
        table = torch.where(table >= 0, table + offset, -1)
        tables.append(torch.nn.functional.pad(table, (0, width - table.shape[2]), value=-1))
        offset += count
    joined = {key: torch.cat(parts) for key, parts in out.items()}
    joined["table"] = torch.cat(tables)
    for key in exports[0]:
        if "." not in key and key != "table":
            joined[key] = torch.cat([exported[key] for exported in exports])
    return joined
