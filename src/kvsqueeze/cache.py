"""``CompressedCache``: a ``transformers.Cache`` with ragged per-(batch, KV head) storage.

Each layer stores, per (batch row, KV head), only the tokens that head keeps: post-RoPE keys and
values, the slot (index in the full sequence) of each token, and optionally a running score of a
stateful scorer. Until the first eviction every head holds slots ``0..seen-1``, so slots are
implied and not stored (a full cache holds what ``DynamicCache`` holds). ``get_seq_length``
reports the *true* number of tokens fed (RoPE positions keep counting after eviction); masks are
rebuilt per head from the stored slots by the attention hook (``kvsqueeze.attention``).
``nbytes`` is the sum of the bytes of every tensor held at rest.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvsqueeze import ragged
from kvsqueeze.compat import rope_inverse_frequencies
from kvsqueeze.quantized_store import Body, body_from_tensors, new_body, with_prefix
from kvsqueeze.quantizers.base import RESIDUAL_DTYPE, Quantizer

if TYPE_CHECKING:
    from kvsqueeze.recipe import Recipe


@dataclass
class LayerView:
    """Transient padded view of one layer, handed from ``update`` to the attention hook.

    ``keys``/``values`` are ``[B, Hkv, L, D]`` in the model's dtype (quantized tokens
    dequantized); ``slots`` ``[B, Hkv, L]`` (``-1`` = padding); ``scores`` ``[B, Hkv, L]`` or
    None; per head the ``body_lengths [B, Hkv]`` first entries are quantized tokens. ``is_prefix``
    is True when every head holds exactly the slots ``0..L-1`` (nothing evicted), so the model's
    own mask applies unchanged.
    """

    layer: CompressedLayer
    keys: torch.Tensor
    values: torch.Tensor
    slots: torch.Tensor
    scores: torch.Tensor | None
    body_lengths: torch.Tensor
    is_prefix: bool


class CompressedLayer(CacheLayerMixin):
    """One decoder layer's ragged storage (see module docstring).

    ``keys``/``values``/``slots``/``scores`` hold each head's tokens in full precision; with a
    quantizer in the recipe they hold only the recent window (in 16 bits) and ``body`` holds the
    older tokens, quantized (``kvsqueeze.quantized_store``).
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, cache: CompressedCache):
        super().__init__()
        self.cache = cache
        self.slots: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.lengths: torch.Tensor | None = None
        self.seen = 0
        self.context_seen: torch.Tensor | None = None
        self.offsets: torch.Tensor | None = None
        self.body: Body | None = None

    @property
    def quantizer(self) -> Quantizer | None:
        return None if self.cache.recipe is None else self.cache.recipe.quantizer

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        storage = self.dtype if self.quantizer is None else RESIDUAL_DTYPE
        self.keys = key_states.new_empty((0, dim), dtype=storage)
        self.values = value_states.new_empty((0, value_states.shape[-1]), dtype=storage)
        self.lengths = torch.zeros(batch, heads, dtype=torch.long, device=self.device)
        self.context_seen = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.offsets = torch.zeros(batch, dtype=torch.long, device=self.device)
        if self.quantizer is not None:
            self.body = new_body(self.quantizer, batch, heads, self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store the new tokens of every head and return the padded view for attention."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, heads, q_len, _ = key_states.shape
        self.keys = ragged.append(self.keys, self.lengths, key_states)
        self.values = ragged.append(self.values, self.lengths, value_states)
        if self.slots is not None:
            new_slots = torch.arange(self.seen, self.seen + q_len, dtype=torch.int32, device=self.device)
            self.slots = ragged.append(self.slots, self.lengths, new_slots.expand(batch, heads, q_len))
        if self.scores is not None:
            self.scores = ragged.append(self.scores, self.lengths, self.scores.new_zeros(batch, heads, q_len))
        self.lengths = self.lengths + q_len
        self.seen += q_len
        view = self.view()
        # the attention hook finds the layer through the returned tensor: the model passes nothing else
        view.keys.kvsqueeze_view = view
        return view.keys, view.values

    def _body_lengths(self) -> torch.Tensor:
        return torch.zeros_like(self.lengths) if self.body is None else self.body.lengths

    def held_lengths(self) -> torch.Tensor:
        """``[B, Hkv]`` tokens each head holds, quantized ones included."""
        return self.lengths + self._body_lengths()

    def _with_body(self, recent: torch.Tensor, name: str) -> torch.Tensor:
        """Per head, the quantized body's ``name`` entries then the recent window's: packed."""
        if self.body is None or self.body.empty:
            return recent
        return ragged.concat(self.body.field(name).to(recent.dtype), self.body.lengths, recent, self.lengths)

    def view(self) -> LayerView:
        """The padded ``[B, Hkv, L, D]`` view of what this layer holds (quantized tokens first)."""
        lengths = self.held_lengths()
        if self.slots is None:
            slots = torch.arange(self.seen, device=self.device).expand(*self.lengths.shape, self.seen)
        else:
            slots = ragged.pad(self._with_body(self.slots, "slots"), lengths, fill=-1).long()
        scores = None if self.scores is None else ragged.pad(self._with_body(self.scores, "scores"), lengths)
        if self.body is not None and not self.body.empty:
            older_keys, older_values = self.body.dequantized()
            keys = ragged.concat(older_keys.to(self.dtype), self.body.lengths, self.keys, self.lengths)
            values = ragged.concat(older_values.to(self.dtype), self.body.lengths, self.values, self.lengths)
        else:
            keys, values = self.keys.to(self.dtype), self.values.to(self.dtype)
        return LayerView(
            layer=self,
            keys=ragged.pad(keys, lengths),
            values=ragged.pad(values, lengths),
            slots=slots,
            scores=scores,
            body_lengths=self._body_lengths(),
            is_prefix=self.slots is None,
        )

    def keep(
        self,
        view: LayerView,
        keep: torch.Tensor,
        scores: torch.Tensor | None,
        demote: torch.Tensor | None = None,
    ) -> None:
        """Replace storage by the ``keep [B, Hkv, L]`` subset of ``view`` (and new scorer state).

        Quantized tokens keep their codes (no re-quantization); recent ones are copied back.
        ``demote [B, Hkv, L]`` (a demoting quantizer, ``mixed``) marks tokens to store in its
        low-bit tier instead of dropping; tokens already there stay.
        """
        moving = None
        if demote is not None:
            keep, moving = self._demotions(view, keep, demote, scores)
        in_body = torch.arange(keep.shape[-1], device=keep.device) < view.body_lengths[..., None]
        recent = (view.slots >= 0) & ~in_body
        evicted = not bool((keep == (view.slots >= 0)).all())
        if self.body is not None and not self.body.empty:
            if scores is not None:
                self.body.set_field("scores", scores[in_body].float())
            if evicted:
                if self.slots is None:
                    self.body.set_field("slots", view.slots[in_body].to(torch.int32))
                self.body.keep(keep[in_body])
        if not evicted:
            self.scores = None if scores is None else scores[recent].float()
            return
        kept = keep & recent
        self.keys = view.keys[kept].to(self.keys.dtype)
        self.values = view.values[kept].to(self.values.dtype)
        self.slots = view.slots[kept].to(torch.int32)
        self.scores = None if scores is None else scores[kept].float()
        self.lengths = kept.sum(-1)
        if moving is not None:
            self.body.demote(*moving)

    def _demotions(
        self, view: LayerView, keep: torch.Tensor, demote: torch.Tensor, scores: torch.Tensor | None
    ) -> tuple[torch.Tensor, tuple | None]:
        """The keep mask plus the low tier's tokens and the demoted ones' keys, values, fields
        and counts per head (None if nothing new is demoted)."""
        in_low = torch.arange(keep.shape[-1], device=keep.device) < self.body.low.lengths[..., None]
        demote = demote & ~keep & ~in_low
        if not bool(demote.any()):
            return keep | in_low, None
        fields = {"slots": view.slots[demote].to(torch.int32)}
        if scores is not None:
            fields["scores"] = scores[demote].float()
        moving = (view.keys[demote].float(), view.values[demote].float(), fields, demote.sum(-1))
        return keep | in_low, moving

    def settle(self) -> None:
        """Quantize, ``group_size`` at a time, the oldest tokens beyond each head's recent window."""
        if self.body is None:
            return
        group, window = self.body.quantizer.group_size, self.body.quantizer.residual
        moving_counts = (self.lengths - window).clamp(min=0) // group * group
        if not bool(moving_counts.any()):
            return
        longest = int(self.lengths.max())
        moving = ragged.occupancy(moving_counts, longest)
        staying = ragged.occupancy(self.lengths, longest) & ~moving
        fields = {name: ragged.pad(t, self.lengths) for name, t in self.token_tensors().items()}
        extra = {name: fields[name][moving] for name in ("slots", "scores") if name in fields}
        self.body.append(
            fields["keys"][moving].float(), fields["values"][moving].float(), extra, moving_counts
        )
        for name, padded in fields.items():
            setattr(self, name, padded[staying])
        self.lengths = self.lengths - moving_counts

    def token_tensors(self) -> dict[str, torch.Tensor]:
        """The per-token tensors of the recent (unquantized) part, by name."""
        return {name: getattr(self, name) for name in self.TOKEN_FIELDS if getattr(self, name) is not None}

    def nbytes(self, kv_dtype: torch.dtype | None = None) -> int:
        """Bytes held at rest by this layer (keys, values, slots, scorer state, lengths); with
        ``kv_dtype``, keys and values held in the model's dtype count at ``kv_dtype``'s size."""
        if not self.is_initialized:
            return 0
        total = 0
        for name, t in self.tensors().items():
            resized = kv_dtype is not None and name in ("keys", "values") and t.dtype == self.dtype
            total += t.numel() * (kv_dtype.itemsize if resized else t.element_size())
        return total

    def tokens_kept(self) -> int:
        return 0 if not self.is_initialized else int(self.held_lengths().sum())

    def get_seq_length(self) -> int:
        return self.seen

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``tokens_to_remove`` slots as if they had never been fed: their tokens
        leave storage and ``seen`` rewinds, so the next token takes the first forgotten slot.

        With a quantizer, earlier tokens that the forgotten ones pushed out of the 16-bit recent
        window stay quantized."""
        if not self.is_initialized or tokens_to_remove <= 0:
            return
        length = self.seen - tokens_to_remove
        implied = self.slots is None
        view = self.view()
        self.keep(view, (view.slots >= 0) & (view.slots < length), view.scores)
        self.seen = length
        if implied and (self.body is None or self.body.empty):
            self.slots = None  # every head still holds slots 0..length-1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.cache)

    def _select_batch(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (any order, repeats allowed) of every stored tensor."""
        if not self.is_initialized:
            return
        index = index.to(self.device)
        for name, packed in self.token_tensors().items():
            setattr(self, name, ragged.select_rows(packed, self.lengths, index))
        for name in self.ROW_FIELDS:
            setattr(self, name, getattr(self, name)[index])
        if self.body is not None:
            self.body.select_rows(index)

    TOKEN_FIELDS = ("keys", "values", "slots", "scores")
    ROW_FIELDS = ("lengths", "context_seen", "offsets")

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this layer holds, by name (what ``nbytes`` counts and a store saves)."""
        names = self.TOKEN_FIELDS + self.ROW_FIELDS
        named = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        if self.body is not None:
            named.update({f"body.{name}": t for name, t in self.body.tensors().items()})
        return named

    def load(self, tensors: dict[str, torch.Tensor], seen: int, dtype: torch.dtype) -> None:
        """Restore what ``tensors()`` returned, the true length ``seen`` and the model's dtype."""
        for name in self.TOKEN_FIELDS + self.ROW_FIELDS:
            setattr(self, name, tensors.get(name))
        body = with_prefix(tensors, "body.")
        if body and self.quantizer is None:
            raise ValueError("quantized tensors found, but the recipe has no quantizer")
        self.body = body_from_tensors(self.quantizer, body) if body else None
        self.dtype, self.device = dtype, self.keys.device
        self.seen = seen
        self.is_initialized = True

    def validate(self) -> None:
        """Raise ``ValueError`` if the stored tensors do not describe a consistent layer."""
        total = int(self.lengths.sum())
        for name, packed in self.token_tensors().items():
            if packed.shape[0] != total:
                raise ValueError(f"{name} holds {packed.shape[0]} tokens, lengths say {total}")
        if self.body is not None:
            self.body.validate()
            if not self.body.empty and (self.body.field("slots") is not None) != (self.slots is not None):
                raise ValueError("quantized and recent tokens disagree on whether slots are stored")
        if self.slots is None and bool((self.held_lengths() != self.seen).any()):
            raise ValueError("a layer without stored slots must hold every token it has seen")
        if self.slots is not None and total and int(self.slots.max()) >= self.seen:
            raise ValueError("a stored slot lies beyond the layer's length")

    def ensure_slots(self) -> None:
        """Store the implied slots (``0..seen-1`` per head) explicitly, before rows are shifted."""
        if self.slots is not None:
            return
        rows = self.lengths.numel()
        quantized = int(self._body_lengths().flatten()[0]) if rows else 0
        if self.body is not None and not self.body.empty:
            implied = torch.arange(quantized, dtype=torch.int32, device=self.device).repeat(rows)
            self.body.set_field("slots", implied)
        self.slots = torch.arange(quantized, self.seen, dtype=torch.int32, device=self.device).repeat(rows)

    def shift_rows(self, shift: int) -> None:
        """Move every slot by ``shift`` (and ``seen``, ``offsets``): the gap holds nothing."""
        if not shift:
            return
        self.ensure_slots()
        self.slots = self.slots + shift
        if self.body is not None and self.body.field("slots") is not None:
            self.body.set_field("slots", self.body.field("slots") + shift)
        self.offsets = self.offsets + shift
        self.seen += shift

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            rows = torch.arange(self.lengths.shape[0], device=self.device)
            self._select_batch(rows.repeat_interleave(repeats))


class CompressedCache(Cache):
    """KV cache that compresses the context with a ``Recipe`` as it is prefilled.

    Every forward pass of more than one token (a prefill chunk) is compressed layer by layer right
    after its attention, so peak KV memory is the budget plus one chunk. Single-token decode steps
    are stored as they come. ``settings(...)`` changes that behaviour for a block of code.

    Parameters
    ----------
    recipe : what to keep (``Recipe.parse("snapkv@0.75")``); None or ``full`` keeps everything.
    """

    def __init__(self, recipe: Recipe | None = None):
        super().__init__(layer_class_to_replicate=partial(CompressedLayer, cache=self))
        self.recipe = recipe
        self.compress_prefill = True
        self.protect_from: int | None = None
        self.quantize_now = True
        self._rope_inv_freq: dict[torch.device, torch.Tensor | None] = {}
        self.budget_state: dict = {}
        self.unit_ids: torch.Tensor | None = None

    @contextmanager
    def settings(
        self,
        compress_prefill: bool | None = None,
        protect_from: int | None = None,
        quantize_now: bool | None = None,
    ):
        """Temporarily turn prefill compression on/off, protect every slot ``>= protect_from``,
        or (``quantize_now=False``) hold every new token in 16 bits until ``settle()``.

        Protected tokens (e.g. the question in query-aware mode) are always kept and are not
        counted in the budget. Holding quantization lets a later pass evict before anything is
        quantized, so no group is thinned after it got its scales (KVzip's reconstruction).
        """
        saved = (self.compress_prefill, self.protect_from, self.quantize_now)
        if compress_prefill is not None:
            self.compress_prefill = compress_prefill
        if protect_from is not None:
            self.protect_from = protect_from
        if quantize_now is not None:
            self.quantize_now = quantize_now
        try:
            yield self
        finally:
            self.compress_prefill, self.protect_from, self.quantize_now = saved

    def settle(self) -> None:
        """Quantize in every layer what a quantizer moves out of the 16-bit recent window."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.settle()

    def set_units(self, unit_ids: torch.Tensor | None) -> None:
        """Give the first ``n`` slots of each row their unit, ``unit_ids [B, n]`` (the slot of the
        unit's first token; ``Unit.unit_ids``), for recipes that keep units whole."""
        self.unit_ids = unit_ids

    def units_of(self, slots: torch.Tensor) -> torch.Tensor | None:
        """``[B, H, L]`` unit of each slot in ``slots``; a slot past the known ones is its own unit."""
        if self.unit_ids is None:
            return None
        known = self.unit_ids.to(slots.device)
        batch, count = known.shape
        inside = (slots >= 0) & (slots < count)
        looked_up = known.gather(1, slots.clamp(0, count - 1).reshape(batch, -1)).reshape(slots.shape)
        return torch.where(inside, looked_up, slots)

    def count_context(self, tokens: torch.Tensor) -> None:
        """Add ``tokens [B]`` context tokens per row to every layer's budget base.

        A compression step counts only the unprotected tokens of its own chunk; context fed with
        compression off and compressed later (KVzip's reconstruction pass) is counted here.
        """
        for layer in self.layers:
            if layer.is_initialized:
                layer.context_seen = layer.context_seen + tokens.to(layer.device)

    def compresses(self, query_length: int) -> bool:
        """Whether a forward of ``query_length`` new tokens is compressed."""
        recipe = self.recipe
        return query_length > 1 and self.compress_prefill and recipe is not None and recipe.evicts

    def rope_inv_freq(self, config, device: torch.device) -> torch.Tensor | None:
        """The model's RoPE inverse frequencies (computed once per device), for scorers."""
        if device not in self._rope_inv_freq:
            inv_freq = rope_inverse_frequencies(config)
            self._rope_inv_freq[device] = None if inv_freq is None else inv_freq.to(device)
        return self._rope_inv_freq[device]

    def nbytes(self, kv_dtype: torch.dtype | None = None) -> int:
        """Bytes actually held by the tensors of every layer.

        With ``kv_dtype`` (e.g. ``torch.float16``): the bytes this cache would hold in a model
        running in that dtype — unquantized keys and values at its size; codes, scales, the
        16-bit recent window of a quantizer and slot indices unchanged. Compare with
        ``nbytes_full(kv_dtype)`` for the reduction a 16-bit deployment would see.
        """
        return sum(layer.nbytes(kv_dtype) for layer in self.layers)

    def nbytes_full(self, dtype: torch.dtype | None = None) -> int:
        """Bytes an uncompressed cache would hold for the same tokens (keys + values only).

        ``dtype`` defaults to the dtype of the stored keys; pass ``torch.float16`` for the 16-bit
        reference used by the papers.
        """
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                batch, heads = layer.lengths.shape
                size = (dtype or layer.dtype).itemsize
                dims = layer.keys.shape[-1] + layer.values.shape[-1]
                total += batch * heads * layer.seen * dims * size
        return total

    def tokens_kept(self) -> int:
        """Stored (batch, layer, head, token) entries, summed."""
        return sum(layer.tokens_kept() for layer in self.layers)

    @property
    def kv_dtype(self) -> torch.dtype | None:
        return next((layer.dtype for layer in self.layers if layer.is_initialized), None)

    @classmethod
    def stack(cls, caches: list[CompressedCache]) -> CompressedCache:
        """One batch made of the rows of ``caches`` (same recipe, same model), ends aligned.

        A row that has seen fewer tokens than the longest is shifted right, as left padding
        would: its slots and ``offsets`` grow by the difference, nothing is stored for the gap.
        Pass position ids per row and a 2D mask whose first ``offsets[row]`` columns are 0.
        """
        recipes = {str(cache.recipe) for cache in caches}
        if len(recipes) > 1:
            raise ValueError(f"cannot stack caches made with different recipes: {sorted(recipes)}")
        stacked = cls(caches[0].recipe)
        for layers in zip(*(cache.layers for cache in caches), strict=True):
            stacked.layers.append(_stack_layers(stacked, list(layers)))
        return stacked

    def split(self) -> list[CompressedCache]:
        """The inverse of ``stack``: one single-row cache per batch row, offsets removed."""
        batch = self.layers[0].lengths.shape[0]
        rows = [type(self)(self.recipe) for _ in range(batch)]
        for layer in self.layers:
            for row, cache in enumerate(rows):
                single = CompressedLayer(cache)
                single.load(layer.tensors(), layer.seen, layer.dtype)
                single._select_batch(torch.tensor([row]))
                single.shift_rows(-int(single.offsets[0]))
                cache.layers.append(single)
        return rows

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Named tensors (``"<layer>.<field>"``) and JSON-able metadata to rebuild this cache.

        ``budget_state`` is not saved (nor stacked): budgets only keep state within one forward
        (CAKE starts over at layer 0 of every compressed forward, DuoAttention reloads its profile).
        """
        tensors = {
            f"{i}.{name}": t for i, layer in enumerate(self.layers) for name, t in layer.tensors().items()
        }
        meta = {
            "recipe": str(self.recipe or "full"),
            "seen": [layer.seen for layer in self.layers],
            "dtype": str(self.kv_dtype).removeprefix("torch."),
        }
        return tensors, meta

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], meta: dict) -> CompressedCache:
        """Rebuild a cache saved with ``state_dict`` (raises ``ValueError`` if inconsistent)."""
        from kvsqueeze.recipe import Recipe

        cache = cls(Recipe.parse(meta["recipe"]))
        dtype = getattr(torch, meta["dtype"])
        for index, seen in enumerate(meta["seen"]):
            prefix = f"{index}."
            fields = {key[len(prefix) :]: t for key, t in tensors.items() if key.startswith(prefix)}
            layer = CompressedLayer(cache)
            layer.load(fields, seen, dtype)
            layer.validate()
            cache.layers.append(layer)
        return cache


def _stack_layers(cache: CompressedCache, layers: list[CompressedLayer]) -> CompressedLayer:
    """Rows of ``layers`` one after another, shifted so that they all end at the same slot.

    Shifting stores the implied slots of the source layers (``ensure_slots``).
    """
    seen = max(layer.seen for layer in layers)
    if any(layer.seen != seen or layer.slots is not None for layer in layers):
        for layer in layers:
            layer.ensure_slots()
    named = []
    for layer in layers:
        tensors = layer.tensors()
        shift = seen - layer.seen
        for name in tensors:
            if shift and (name in ("slots", "offsets") or name.endswith("token.slots")):
                tensors[name] = tensors[name] + shift
        named.append(tensors)
    if len({frozenset(tensors) for tensors in named}) > 1:
        raise ValueError("cannot stack layers that hold different tensors (different scorer state?)")
    stacked = CompressedLayer(cache)
    stacked.load({name: torch.cat([t[name] for t in named]) for name in named[0]}, seen, layers[0].dtype)
    return stacked
