"""``PagedLayer``: one decoder layer's KV storage in blocks, a ``transformers`` cache layer.

A layer holds a ``DenseTier`` (new tokens, in the model's dtype, or in 16 bits when the recipe
quantizes) and, with a quantizer, one ``QuantizedTier`` (two for ``mixed``: low bits, high bits).
``seen`` counts every token fed (RoPE positions keep counting after eviction, as
``get_seq_length`` must report). Until tokens are evicted, slots are implied: each head holds a
contiguous run of slots ending at ``seen - 1`` (tiers in slot order: quantized blocks, then the
dense ones), so nothing but keys and values is stored; the first eviction writes every token's
slot into a per-token ``slots`` field. A sliding-window layer frees the blocks that no later
query can see, so it holds its last ``window - 1`` tokens (in whole blocks) as transformers'
``DynamicSlidingWindowLayer`` does. With ``minicache``, a deeper layer also attends tokens its
host layer stores for both (the host's state rescaled to per-token magnitudes the host keeps in
two carried fields, ``GUEST_NORMS``); it stores none of them itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers.cache_utils import CacheLayerMixin

from kvsqueeze.quantizers.base import RESIDUAL_DTYPE, Quantizer
from kvsqueeze.storage.pool import Workspace
from kvsqueeze.storage.tiers import GUEST_NORMS, DenseTier, QuantizedTier, concat_exports

if TYPE_CHECKING:
    from kvsqueeze.cache import CompressedCache
    from kvsqueeze.recipe import Recipe


FIELD_DEFAULTS = {
    "slots": (torch.int32, -1),
    "scores": (torch.float32, 0),
    **{name: (torch.float16, 0) for name in GUEST_NORMS},
}
"""dtype and initial value of each carried per-token field (``tiers.CARRIED_FIELDS``)."""


def dense_block_size(block_size: int, codecs: list[Quantizer]) -> int:
    """Tokens per block of a layer's 16-bit storage: the cache's ``block_size``, or with block
    codecs (``Recipe.block_codecs``) a divisor of the group size full blocks age into (a group is
    encoded from whole blocks)."""
    return block_size if not codecs else math.gcd(block_size, codecs[-1].group_size)


@dataclass
class HeldTokens:
    """What one layer holds, gathered for attention: ``keys``/``values`` ``[B, H, L, D]`` in the
    query's dtype, ``valid [B, H, L]`` (None: every entry holds a token) and ``slots [B, H, L]``
    (long, ``-1`` where nothing is held). Entries are in storage order, not always slot order.

    ``contiguous`` (then ``valid`` is None): every head holds the same slots ``seen - L .. seen -
    1`` in order, so the model's mask columns apply as they are and ``slots`` is only built when
    asked for.
    """

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor | None
    stored_slots: torch.Tensor | None
    seen: int

    @property
    def contiguous(self) -> bool:
        return self.stored_slots is None

    @property
    def slots(self) -> torch.Tensor:
        if self.stored_slots is not None:
            return self.stored_slots
        batch, heads, length = self.keys.shape[:3]
        first = self.seen - length
        return torch.arange(first, self.seen, device=self.keys.device).expand(batch, heads, length)


@dataclass
class LayerView:
    """A layer's tokens per head in slot order, left-aligned and padded: what scorers read.

    ``keys``/``values`` ``[B, H, L, D]`` (quantized tokens decoded), ``slots [B, H, L]`` (long,
    ``-1`` = padding), ``scores [B, H, L]`` (a stateful scorer's running score, or None),
    ``source [B, H, L]`` (each entry's index among the layer's concatenated tier entries, what
    ``PagedLayer.keep`` maps a keep mask back with) and ``in_dense [B, H, L]`` (entries still in
    16-bit storage, i.e. not quantized yet).
    """

    keys: torch.Tensor
    values: torch.Tensor
    slots: torch.Tensor
    scores: torch.Tensor | None
    source: torch.Tensor
    in_dense: torch.Tensor

    def release(self) -> LayerView:
        """The same view without its keys and values (enough to keep or drop entries)."""
        return LayerView(None, None, self.slots, self.scores, self.source, self.in_dense)


class PagedLayer(CacheLayerMixin):
    """One layer of a ``CompressedCache`` (see module docstring)."""

    is_compileable = False
    is_croppable = True

    def __init__(self, cache: CompressedCache, window: int | None = None):
        super().__init__()
        self.cache = cache
        self.window = window
        self.seen = 0
        self.explicit_slots = False
        self.record_past = False
        self.dense: DenseTier | None = None
        self.quantized: list[QuantizedTier] = []

    @property
    def is_sliding(self) -> bool:
        return self.window is not None

    @property
    def recipe(self) -> Recipe | None:
        """The recipe this layer is compressed with (None: kept as transformers keeps it)."""
        return self.cache.recipe_for(self)

    @property
    def tiers(self) -> list:
        """Quantized tiers first, then the dense one: slot order while slots are implied."""
        return [*self.quantized, self.dense]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, key_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        recipe = self.recipe
        codecs = [] if recipe is None else recipe.block_codecs(key_dim)
        size = dense_block_size(self.cache.block_size, codecs)
        dtype = self.dtype if not codecs else RESIDUAL_DTYPE
        self.dense = DenseTier(batch, heads, size, key_dim, value_states.shape[-1], dtype, self.device)
        self.quantized = [QuantizedTier(codec, batch, heads, key_dim, self.device) for codec in codecs]
        self.is_initialized = True

    # ---- feeding ------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store the new tokens of every head; the returned key tensor leads attention back here."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, heads, q_len, _ = key_states.shape
        fields = {"keys": key_states, "values": value_states}
        if self.explicit_slots:
            new = torch.arange(self.seen, self.seen + q_len, dtype=torch.int32, device=self.device)
            fields["slots"] = new.expand(batch, heads, q_len)
        for name in ("scores", *GUEST_NORMS):
            if name in self.dense.token_fields:
                fields[name] = key_states.new_zeros(batch, heads, q_len)
        self.dense.append(fields)
        self.seen += q_len
        # the attention function finds the layer through the returned tensor: the model passes nothing else
        key_states.kvsqueeze_layer = self
        return key_states, value_states

    def after_forward(self, quantize: bool) -> None:
        """What follows a forward: a sliding layer lets go of what no later query sees; with
        ``quantize``, full blocks out of the 16-bit window are encoded."""
        if self.is_sliding and not self.record_past:
            self._drop_unseen()
        if quantize:
            self.settle()

    def _drop_unseen(self) -> None:
        """Free the dense blocks whose tokens no query from slot ``seen`` on can see (sliding)."""
        first_visible = self.seen - self.window + 1
        dense, size = self.dense, self.dense.block_size
        if dense.uniform and not self.explicit_slots:
            dense.drop_front(max(dense.longest - (self.seen - first_visible), 0) // size)
            return
        if self.explicit_slots:
            columns = torch.arange(dense.table.shape[2], device=self.device)
            last_slots = dense.read("slots", dense.table * size + size - 1)
            dead = ((columns < (dense.count // size)[..., None]) & (last_slots < first_visible)).sum(-1)
        else:  # the dense tokens hold the last ``count`` slots
            dead = (dense.count - (self.seen - first_visible)).clamp(min=0) // size
        if bool((dead > 0).any()):
            dense.drop_front(dead)

    def held_lengths(self) -> torch.Tensor:
        """``[B, Hkv]`` tokens each head holds, quantized ones included (a new tensor)."""
        held = self.dense.count.clone()
        for tier in self.quantized:
            held = held + tier.count
        return held

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # masks are built over slots and gathered per head by the attention function
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    # ---- reading ------------------------------------------------------------------------------
    def _entries(self, name: str) -> list[torch.Tensor]:
        """Per tier, field ``name`` of every gathered entry (tiers in ``tiers`` order)."""
        return [tier.gather(name) for tier in self.tiers]

    def _held_masks(self) -> list[torch.Tensor]:
        return [tier.held() for tier in self.tiers]

    def _entry_slots(self, held: torch.Tensor) -> torch.Tensor:
        """``[B, H, E]`` slot of each concatenated entry (``-1`` where nothing is held)."""
        if self.explicit_slots:
            slots = torch.cat(self._entries("slots"), dim=2).long()
        else:
            rank = held.long().cumsum(-1) - 1
            slots = self.seen - self.held_lengths()[..., None] + rank
        return torch.where(held, slots, -1)

    def held_tokens(self, dtype: torch.dtype, workspace: Workspace | None = None) -> HeldTokens:
        """Every token this layer attends, in ``dtype`` (see ``HeldTokens``): what it stores, then
        the tokens it shares with its host layer (``minicache``). With ``workspace``, the gathered
        keys and values of what it stores live in its buffers, valid until the next layer's gather."""
        own = self._stored_tokens(dtype, workspace)
        if not self.reads_host:
            return own
        shared = self._shared_tokens(dtype)
        valid = own.valid if own.valid is not None else torch.ones_like(own.slots, dtype=torch.bool)
        return HeldTokens(
            torch.cat([own.keys, shared.keys], dim=2),
            torch.cat([own.values, shared.values], dim=2),
            torch.cat([valid, shared.valid], dim=2),
            torch.cat([own.slots, shared.stored_slots], dim=2),
            self.seen,
        )

    @property
    def host(self) -> PagedLayer | None:
        """The shallower layer this one shares merged tokens with (``minicache``), or None."""
        return self.cache.host_of(self)

    @property
    def reads_host(self) -> bool:
        """Whether this layer attends tokens stored in its host layer (some were merged)."""
        host = self.host
        return host is not None and host.is_initialized and GUEST_NORMS[0] in host.dense.token_fields

    def _shared_tokens(self, dtype: torch.dtype) -> HeldTokens:
        """The tokens this layer shares with its host: the host's states rescaled to this layer's
        magnitudes, ``valid`` where a token is shared (every host entry is listed)."""
        host = self.host
        held = host.held_tokens(dtype)
        key_norms, value_norms = (torch.cat(host._entries(name), dim=2) for name in GUEST_NORMS)
        shared = key_norms > 0 if held.valid is None else held.valid & (key_norms > 0)
        keys = F.normalize(held.keys, dim=-1) * key_norms[..., None].to(dtype)
        values = F.normalize(held.values, dim=-1) * value_norms[..., None].to(dtype)
        return HeldTokens(keys, values, shared, torch.where(shared, held.slots, -1), self.seen)

    def _shared_width(self) -> int:
        """Entries ``held_tokens`` lists after the stored ones (the host's, when shared)."""
        return sum(mask.shape[-1] for mask in self.host._held_masks()) if self.reads_host else 0

    def drop_shared(self, kept: torch.Tensor) -> None:
        """Stop sharing the entries where ``kept [B, H, E]`` (this layer's concatenated tier
        entries, as a host) is False: the deeper layer no longer attends them."""
        for name in GUEST_NORMS:
            norms = torch.cat(self._entries(name), dim=2)
            self._write_entries(name, torch.where(kept, norms, 0))

    def _stored_tokens(self, dtype: torch.dtype, workspace: Workspace | None = None) -> HeldTokens:
        """The tokens this layer's tiers store (``held_tokens`` without the shared ones)."""
        dense = self.dense
        if not any(tier.widest for tier in self.quantized):
            keys, values = (self._gather_dense(name, dtype, workspace) for name in ("keys", "values"))
            if dense.uniform and not self.explicit_slots:
                return HeldTokens(keys, values, None, None, self.seen)
            valid = dense.held()
            return HeldTokens(keys, values, valid, self._entry_slots(valid), self.seen)
        decoded = [tier.decode() for tier in self.quantized if tier.widest]  # an empty tier adds no entry
        parts = {
            "keys": [k.to(dtype) for k, _ in decoded] + [dense.gather("keys").to(dtype)],
            "values": [v.to(dtype) for _, v in decoded] + [dense.gather("values").to(dtype)],
        }
        keys, values = (joined(name, pieces, workspace) for name, pieces in parts.items())
        valid = torch.cat(self._held_masks(), dim=2)
        return HeldTokens(keys, values, valid, self._entry_slots(valid), self.seen)

    def _gather_dense(self, name: str, dtype: torch.dtype, workspace: Workspace | None) -> torch.Tensor:
        dense = self.dense
        field = dense.pool.fields[name]
        if workspace is None or field.dtype != dtype:
            return dense.gather(name).to(dtype)
        width = -(-dense.longest // dense.block_size)
        numel = dense.table.shape[0] * dense.table.shape[1] * width * field[0].numel()
        return dense.gather(name, workspace.buffer(name, numel, dtype, self.device))

    def view(self) -> LayerView:
        """This layer's tokens per head in slot order (see ``LayerView``)."""
        held = self.held_tokens(self.dtype)
        valid = held.valid if held.valid is not None else torch.ones_like(held.slots, dtype=torch.bool)
        widths = [mask.shape[-1] for mask in self._held_masks()]
        shared = held.slots.shape[-1] - sum(widths)
        scores = None
        if "scores" in self.dense.token_fields:
            scores = torch.nn.functional.pad(torch.cat(self._entries("scores"), dim=2), (0, shared))
        entry = torch.arange(sum(widths) + shared, device=self.device)
        in_dense = (entry >= sum(widths[:-1])) & (entry < sum(widths))
        longest = int(valid.sum(-1).max()) if valid.numel() else 0
        if held.contiguous:
            order = torch.arange(held.slots.shape[-1], device=self.device).expand_as(held.slots)
        else:
            order = torch.argsort(
                torch.where(valid, held.slots, torch.iinfo(torch.long).max), dim=-1, stable=True
            )
        order = order[..., :longest]
        slots = held.slots.gather(2, order)
        index = order[..., None]
        return LayerView(
            keys=held.keys.gather(2, index.expand(*order.shape, held.keys.shape[-1])),
            values=held.values.gather(2, index.expand(*order.shape, held.values.shape[-1])),
            slots=torch.where(valid.gather(2, order), slots, -1),
            scores=None if scores is None else scores.gather(2, order),
            source=order,
            in_dense=in_dense[order],
        )

    # ---- compressing --------------------------------------------------------------------------
    def set_head_state(self, state: dict[str, torch.Tensor]) -> None:
        """Give the codecs of the encoded tiers what they read per head from now on (e.g.
        ThinK's query magnitudes, ``[B, H, D]``)."""
        for tier in self.quantized:
            tier.head_state.update({name: t.detach().to(self.device) for name, t in state.items()})

    def _ensure_field(self, name: str) -> None:
        """Attach the carried per-token field ``name`` (``FIELD_DEFAULTS``) to every tier."""
        dtype, fill = FIELD_DEFAULTS[name]
        for tier in self.tiers:
            tier.add_token_field(name, (), dtype, fill)

    def make_slots_explicit(self) -> None:
        """Write every held token's slot into a per-token ``slots`` field (before eviction or a
        shift breaks the implied layout)."""
        if self.explicit_slots:
            return
        held = torch.cat(self._held_masks(), dim=2)
        slots = self._entry_slots(held)
        self._ensure_field("slots")
        self._write_entries("slots", slots)
        self.explicit_slots = True

    def _write_entries(self, name: str, values: torch.Tensor) -> None:
        """Write ``values [B, H, E]`` (one per concatenated entry) into field ``name``, tier by tier."""
        start = 0
        for tier, held in zip(self.tiers, self._held_masks(), strict=True):
            width = held.shape[-1]
            part = values[:, :, start : start + width]
            tier.write(name, tier.positions()[held], part[held])
            start += width

    def keep(
        self,
        view: LayerView,
        keep: torch.Tensor,
        scores: torch.Tensor | None = None,
        demote: torch.Tensor | None = None,
    ) -> None:
        """Keep the entries of ``view`` where ``keep [B, H, L]`` is True and drop the others.

        ``scores [B, H, L]`` is a stateful scorer's new running score (stored for every entry).
        ``demote [B, H, L]`` (a demoting quantizer, ``mixed``) marks 16-bit tokens to encode into
        the low-bit tier instead of dropping them; a token already quantized is never re-encoded.
        """
        held = view.slots >= 0
        if scores is not None:
            self._ensure_field("scores")
            self._write_entries("scores", self._scatter_entries(view, scores.float()))
        if not bool((held & ~keep).any()):
            return
        self.make_slots_explicit()
        moving = None
        if demote is not None:
            demote = demote & ~keep & held & view.in_dense
            if bool(demote.any()):
                first = sum(held.shape[-1] for held in self._held_masks()[:-1])
                in_dense = self._scatter_entries(view, demote)[:, :, first : first + self.dense.longest]
                chosen = in_dense & self.dense.held()
                positions = self.dense.positions()[chosen]
                moving = (
                    {name: self.dense.read(name, positions) for name in self.dense.token_fields},
                    chosen,
                )
        entries = self._scatter_entries(view, keep & held)
        start = 0
        for tier, held_mask in zip(self.tiers, self._held_masks(), strict=True):
            width = held_mask.shape[-1]
            tier.keep(entries[:, :, start : start + width])
            start += width
        if start < entries.shape[-1]:
            self.host.drop_shared(entries[:, :, start:])
        if moving is not None:
            fields, chosen = moving
            self.quantized[0].add(fields, chosen.sum(-1))
        for tier in self.tiers:
            tier.release_slack()

    def rewrite(self, view: LayerView, fields: dict[str, torch.Tensor], entries: torch.Tensor) -> None:
        """Overwrite per-token fields of the view entries ``entries [B, H, L]``: ``fields`` maps a
        field name (``keys``, ``values``, a carried field) to its new values ``[B, H, L, ...]`` (view
        order), stored in the field's dtype (a merge). The entries must be in 16-bit storage
        (``view.in_dense``): quantized blocks are never re-encoded. Call it before ``keep``, which
        moves entries."""
        if not bool(entries.any()):
            return
        if bool((entries & ~view.in_dense).any()):
            raise ValueError(
                "only tokens in 16-bit storage can be rewritten; quantized ones are encoded once"
            )
        quantized_entries = sum(held.shape[-1] for held in self._held_masks()[:-1])
        in_dense = (view.source - quantized_entries).clamp(min=0, max=self.dense.longest - 1)
        positions = self.dense.positions().gather(2, in_dense)
        for name, values in fields.items():
            if name not in self.dense.token_fields:
                self._ensure_field(name)
            self.dense.write(name, positions[entries], values[entries])

    def _scatter_entries(self, view: LayerView, values: torch.Tensor) -> torch.Tensor:
        """A view-order tensor ``[B, H, L]`` laid out over the concatenated tier entries ``[B, H, E]``
        (entries the view does not show get zeros / False)."""
        width = sum(held.shape[-1] for held in self._held_masks()) + self._shared_width()
        out = values.new_zeros(*values.shape[:2], width)
        return out.scatter(2, view.source, values.masked_fill(view.slots < 0, 0))

    def settle(self) -> None:
        """Encode, one quantizer group at a time, the oldest dense tokens that have at least
        ``residual`` newer tokens after them (a group is made of whole dense blocks)."""
        if not self.quantized:
            return
        dense, size = self.dense, self.dense.block_size
        target = self.quantized[-1]
        group, residual = target.quantizer.group_size, target.quantizer.residual
        if dense.longest - residual < group:
            return
        moving = (dense.count - residual).clamp(min=0) // group * group  # tokens per head
        columns = torch.arange(dense.table.shape[2], device=self.device)
        chosen = columns < (moving // size)[..., None]
        entries = dense.table[chosen][:, None] * size + torch.arange(size, device=self.device)
        fields = {name: dense.read(name, entries.flatten()) for name in dense.token_fields}
        target.add(fields, moving)
        dense.drop_front(moving // size)

    # ---- transformers' cache protocol --------------------------------------------------------
    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` tokens, as transformers 5.23's layers do: a
        negative count removes that many, a positive one is refused. The next token takes the
        first forgotten slot. Earlier tokens that the forgotten ones pushed out of a quantizer's
        16-bit window stay quantized. A sliding layer that has passed its window can roll back
        only if ``activate_past_recording`` was called (it then kept the tokens that slid out)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"Calling `crop` with a positive value (`{tokens_to_remove}`) is not supported. "
                "Please use a negative integer to remove that number of tokens from the cache instead."
            )
        if not self.is_initialized:
            return
        if self.is_sliding and self.seen >= self.window and not self.record_past:
            raise RuntimeError(
                "`crop` was called, but the current layer does not track past states, and the sliding "
                "window size was already reached. Call `activate_past_recording` before `crop` to be able "
                "to rollback the cache."
            )
        remove = -tokens_to_remove
        if remove:
            length = self.seen - remove
            implied_dense = not self.explicit_slots and not any(t.widest for t in self.quantized)
            if implied_dense and self.dense.uniform:
                self.dense.truncate(min(remove, self.dense.longest))
            else:
                view = self.view().release()
                self.keep(view, view.slots < length)
            self.seen = length
        if self.is_sliding:
            self._drop_unseen()

    def activate_past_recording(self) -> None:
        """Keep tokens that slide out of the window until ``crop`` (assisted decoding rolls back)."""
        self.record_past = True

    def reset(self) -> None:
        self.__init__(self.cache, self.window)

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (any order, repeats allowed); blocks are copied so that no
        two rows share one."""
        if self.is_initialized:
            for tier in self.tiers:
                tier.select_rows(index.to(self.device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_rows(indices)

    # ---- bytes --------------------------------------------------------------------------------
    def nbytes(self, kv_dtype: torch.dtype | None = None) -> int:
        """Bytes held at rest: the blocks in use of every tier plus its table and counts; with
        ``kv_dtype``, dense keys and values in the model's dtype count at ``kv_dtype``'s size."""
        if not self.is_initialized:
            return 0
        total = 0
        for tier in self.tiers:
            resize = {}
            if (
                kv_dtype is not None
                and tier is self.dense
                and self.dense.pool.fields["keys"].dtype == self.dtype
            ):
                resize = {"keys": kv_dtype.itemsize, "values": kv_dtype.itemsize}
            total += tier.pool.used * tier.pool.per_block_bytes(resize)
            total += sum(t.numel() * t.element_size() for t in tier.bookkeeping())
        return total

    def nbytes_reserved(self) -> int:
        """Bytes of blocks allocated in the pools but not in use (slack, not counted in ``nbytes``)."""
        if not self.is_initialized:
            return 0
        return sum((t.pool.capacity - t.pool.used) * t.pool.per_block_bytes() for t in self.tiers)

    def tokens_kept(self) -> int:
        return 0 if not self.is_initialized else int(self.held_lengths().sum())

    # ---- saving -------------------------------------------------------------------------------
    def export(self, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Every tensor this layer holds in use (of batch ``rows`` only), by name
        (``<tier>.<name>``): what a store saves and ``load`` restores."""
        named = {}
        for label, tier in zip(self.tier_labels(), self.tiers, strict=True):
            named.update({f"{label}.{key}": t for key, t in tier.export(rows).items()})
        return named

    def tier_labels(self) -> list[str]:
        return [f"quantized{i}" for i in range(len(self.quantized))] + ["dense"]

    def load(self, named: dict[str, torch.Tensor], seen: int, dtype: torch.dtype, explicit: bool) -> None:
        """Restore what ``export()`` returned (``named`` may hold several stacked rows); raise
        ``ValueError`` if it holds tiers this layer's recipe does not have."""
        count, keys = named["dense.count"], named["dense.token.keys"]
        values = named["dense.token.values"]
        empty = (count.shape[0], count.shape[1], 0)
        self.lazy_initialization(
            keys.new_empty(*empty, keys.shape[-1]).to(dtype), values.new_empty(*empty, values.shape[-1])
        )
        labels = self.tier_labels()
        unknown = {key.partition(".")[0] for key in named} - set(labels)
        if unknown:
            raise ValueError(f"the saved layer holds {sorted(unknown)}, which its recipe does not store")
        for label, tier in zip(labels, self.tiers, strict=True):
            prefix = f"{label}."
            tier.load({key.removeprefix(prefix): t for key, t in named.items() if key.startswith(prefix)})
        self.seen = seen
        self.explicit_slots = explicit

    def validate(self) -> None:
        """Raise ``ValueError`` if the tiers do not describe a consistent layer."""
        for label, tier in zip(self.tier_labels(), self.tiers, strict=True):
            blocks, stored = tier.blocks_held(), tier.pool.capacity - tier.pool._free_count
            if int(blocks.sum()) != stored:
                raise ValueError(f"{label}: the tables use {int(blocks.sum())} blocks, {stored} are stored")
            used = torch.arange(tier.table.shape[2], device=self.device) < blocks[..., None]
            ids = tier.table[:, :, : used.shape[-1]][used]
            if ids.numel() and (int(ids.max()) >= tier.pool.capacity or ids.unique().numel() != ids.numel()):
                raise ValueError(f"{label}: the tables point at missing or shared blocks")
            if isinstance(tier, QuantizedTier):
                fill = tier.pool.fields["fill"]
                if bool((fill > tier.block_size).any()) or int(fill.sum()) != int(tier.count.sum()):
                    raise ValueError(f"{label}: block fills do not add up to the tokens held")
        if self.explicit_slots:
            slots = torch.cat(self._entries("slots"), dim=2)
            held = torch.cat(self._held_masks(), dim=2)
            if bool((slots[held] >= self.seen).any()):
                raise ValueError("a stored slot lies beyond the layer's length")
        elif bool((self.held_lengths() > self.seen).any()):
            raise ValueError("a layer holds more tokens than it has seen")


def joined(name: str, pieces: list[torch.Tensor], workspace: Workspace | None) -> torch.Tensor:
    """``pieces`` ``[B, H, L_i, D]`` concatenated along the tokens, into ``workspace``'s buffer
    ``name`` when there is one."""
    if workspace is None:
        return torch.cat(pieces, dim=2)
    batch, heads, _, dim = pieces[0].shape
    length = sum(piece.shape[2] for piece in pieces)
    buffer = workspace.buffer(name, batch * heads * length * dim, pieces[0].dtype, pieces[0].device)
    return torch.cat(
        pieces, dim=2, out=buffer[: batch * heads * length * dim].view(batch, heads, length, dim)
    )


def concat_layer_exports(exports: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Several layers' ``export()`` (one layer of several caches) as one batch, tier by tier."""
    labels = dict.fromkeys(key.partition(".")[0] for exported in exports for key in exported)
    joined = {}
    for label in labels:
        prefix = f"{label}."
        parts = [{k.removeprefix(prefix): t for k, t in e.items() if k.startswith(prefix)} for e in exports]
        joined.update({prefix + key: t for key, t in concat_exports(parts).items()})
    return joined
