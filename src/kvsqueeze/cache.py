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

if TYPE_CHECKING:
    from kvsqueeze.recipe import Recipe


@dataclass
class LayerView:
    """Transient padded view of one layer, handed from ``update`` to the attention hook.

    ``keys``/``values`` are ``[B, Hkv, L, D]``; ``slots`` ``[B, Hkv, L]`` (``-1`` = padding);
    ``scores`` ``[B, Hkv, L]`` or None; ``is_prefix`` is True when every head holds exactly the
    slots ``0..L-1`` (nothing evicted), so the model's own mask applies unchanged.
    """

    layer: CompressedLayer
    keys: torch.Tensor
    values: torch.Tensor
    slots: torch.Tensor
    scores: torch.Tensor | None
    is_prefix: bool


class CompressedLayer(CacheLayerMixin):
    """One decoder layer's ragged storage (see module docstring)."""

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

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty((0, dim))
        self.values = value_states.new_empty((0, value_states.shape[-1]))
        self.lengths = torch.zeros(batch, heads, dtype=torch.long, device=self.device)
        self.context_seen = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.offsets = torch.zeros(batch, dtype=torch.long, device=self.device)
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

    def view(self) -> LayerView:
        """The padded ``[B, Hkv, L, D]`` view of what this layer holds."""
        if self.slots is None:
            slots = torch.arange(self.seen, device=self.device).expand(*self.lengths.shape, self.seen)
        else:
            slots = ragged.pad(self.slots, self.lengths, fill=-1).long()
        scores = None if self.scores is None else ragged.pad(self.scores, self.lengths)
        return LayerView(
            layer=self,
            keys=ragged.pad(self.keys, self.lengths),
            values=ragged.pad(self.values, self.lengths),
            slots=slots,
            scores=scores,
            is_prefix=self.slots is None,
        )

    def keep(self, view: LayerView, keep: torch.Tensor, scores: torch.Tensor | None) -> None:
        """Replace storage by the ``keep [B, Hkv, L]`` subset of ``view`` (and new scorer state)."""
        self.scores = None if scores is None else ragged.pack(scores.float(), keep)
        if bool((keep == (view.slots >= 0)).all()):
            return
        self.keys = ragged.pack(view.keys, keep)
        self.values = ragged.pack(view.values, keep)
        self.slots = ragged.pack(view.slots.to(torch.int32), keep)
        self.lengths = keep.sum(-1)

    def nbytes(self) -> int:
        """Bytes held at rest by this layer (keys, values, slots, scorer state, lengths)."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tokens_kept(self) -> int:
        return 0 if not self.is_initialized else int(self.lengths.sum())

    def get_seq_length(self) -> int:
        return self.seen

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
        lengths = self.lengths[index]
        keep = ragged.occupancy(lengths, int(lengths.max()) if lengths.numel() else 0)
        for name in self.TOKEN_FIELDS:
            packed = getattr(self, name)
            if packed is not None:
                setattr(self, name, ragged.pack(ragged.pad(packed, self.lengths)[index], keep))
        for name in self.ROW_FIELDS:
            setattr(self, name, getattr(self, name)[index])

    TOKEN_FIELDS = ("keys", "values", "slots", "scores")
    ROW_FIELDS = ("lengths", "context_seen", "offsets")

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this layer holds, by name (what ``nbytes`` counts and a store saves)."""
        names = self.TOKEN_FIELDS + self.ROW_FIELDS
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def load(self, tensors: dict[str, torch.Tensor], seen: int) -> None:
        """Restore what ``tensors()`` returned (and the true length ``seen``)."""
        for name in self.TOKEN_FIELDS + self.ROW_FIELDS:
            setattr(self, name, tensors.get(name))
        self.dtype, self.device = self.keys.dtype, self.keys.device
        self.seen = seen
        self.is_initialized = True

    def validate(self) -> None:
        """Raise ``ValueError`` if the stored tensors do not describe a consistent layer."""
        total = int(self.lengths.sum())
        for name in self.TOKEN_FIELDS:
            packed = getattr(self, name)
            if packed is not None and packed.shape[0] != total:
                raise ValueError(f"{name} holds {packed.shape[0]} tokens, lengths say {total}")
        if self.slots is None and bool((self.lengths != self.seen).any()):
            raise ValueError("a layer without stored slots must hold every token it has seen")
        if self.slots is not None and total and int(self.slots.max()) >= self.seen:
            raise ValueError("a stored slot lies beyond the layer's length")

    def materialized_slots(self) -> torch.Tensor:
        """Packed int32 slots, built from the implied ``0..seen-1`` when not stored yet."""
        if self.slots is not None:
            return self.slots
        batch, heads = self.lengths.shape
        return torch.arange(self.seen, dtype=torch.int32, device=self.device).repeat(batch * heads)

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
        self._rope_inv_freq: dict[torch.device, torch.Tensor | None] = {}
        self.budget_state: dict = {}

    @contextmanager
    def settings(self, compress_prefill: bool | None = None, protect_from: int | None = None):
        """Temporarily turn prefill compression on/off, or protect every slot ``>= protect_from``.

        Protected tokens (e.g. the question in query-aware mode) are always kept and are not
        counted in the budget.
        """
        saved = (self.compress_prefill, self.protect_from)
        if compress_prefill is not None:
            self.compress_prefill = compress_prefill
        if protect_from is not None:
            self.protect_from = protect_from
        try:
            yield self
        finally:
            self.compress_prefill, self.protect_from = saved

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

    def nbytes(self) -> int:
        """Bytes actually held by the tensors of every layer."""
        return sum(layer.nbytes() for layer in self.layers)

    def nbytes_full(self, dtype: torch.dtype | None = None) -> int:
        """Bytes an uncompressed cache would hold for the same tokens (keys + values only).

        ``dtype`` defaults to the dtype of the stored keys; pass ``torch.float16`` for the 16-bit
        reference used by the papers.
        """
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                batch, heads = layer.lengths.shape
                size = torch.empty(0, dtype=dtype or layer.dtype).element_size()
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
                single.load(layer.tensors(), layer.seen)
                single._select_batch(torch.tensor([row]))
                shift = int(single.offsets[0])
                if shift:
                    single.slots = single.slots - shift
                    single.seen -= shift
                    single.offsets.zero_()
                cache.layers.append(single)
        return rows

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Named tensors (``"<layer>.<field>"``) and JSON-able metadata to rebuild this cache."""
        tensors = {
            f"{i}.{name}": t for i, layer in enumerate(self.layers) for name, t in layer.tensors().items()
        }
        meta = {"recipe": str(self.recipe or "full"), "seen": [layer.seen for layer in self.layers]}
        return tensors, meta

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], meta: dict) -> CompressedCache:
        """Rebuild a cache saved with ``state_dict`` (raises ``ValueError`` if inconsistent)."""
        from kvsqueeze.recipe import Recipe

        cache = cls(Recipe.parse(meta["recipe"]))
        for index, seen in enumerate(meta["seen"]):
            prefix = f"{index}."
            fields = {key[len(prefix) :]: t for key, t in tensors.items() if key.startswith(prefix)}
            layer = CompressedLayer(cache)
            layer.load(fields, seen)
            layer.validate()
            cache.layers.append(layer)
        return cache


def _stack_layers(cache: CompressedCache, layers: list[CompressedLayer]) -> CompressedLayer:
    seen = max(layer.seen for layer in layers)
    aligned = all(layer.seen == seen for layer in layers)
    tensors = {}
    for name in CompressedLayer.TOKEN_FIELDS:
        parts = [getattr(layer, name) for layer in layers]
        if name == "slots":
            if aligned and all(part is None for part in parts):
                continue
            parts = [layer.materialized_slots() + (seen - layer.seen) for layer in layers]
        elif all(part is None for part in parts):
            continue
        elif name == "scores":
            parts = [
                layer.keys.new_zeros(layer.keys.shape[0], dtype=torch.float) if p is None else p
                for layer, p in zip(layers, parts, strict=True)
            ]
        tensors[name] = torch.cat(parts)
    for name in CompressedLayer.ROW_FIELDS:
        tensors[name] = torch.cat([getattr(layer, name) for layer in layers])
    tensors["offsets"] = torch.cat([layer.offsets + (seen - layer.seen) for layer in layers])
    stacked = CompressedLayer(cache)
    stacked.load(tensors, seen)
    return stacked
