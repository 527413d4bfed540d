"""``CompressedCache``: a ``transformers.Cache`` of paged per-(batch, KV head) blocks.

Each layer is a ``PagedLayer`` (``kvsqueeze.storage``): per (batch row, KV head) a table of
fixed-size token blocks holding only the tokens that head keeps, in the model's dtype or
quantized. Appending a token writes into a head's tail block; nothing stored is copied.
``get_seq_length`` reports the *true* number of tokens fed (RoPE positions keep counting after
eviction). ``nbytes`` is the bytes of the blocks in use plus their tables; ``nbytes_reserved``
the pools' free blocks; ``nbytes_full`` what transformers' own default cache would hold for the
same tokens (a sliding-window layer holds its window).

Compression is a step between forwards: during a prefill forward the attention function records
what the recipe asks for, and when the forward ends (``end_forward``, called by the hook that
``kvsqueeze.attention.install`` puts on the model) the cache is compressed
(``kvsqueeze.compression``) and full blocks are quantized. With a decoding component, the
attention function also keeps each layer's latest decode queries, and every ``every`` decode
steps the cache is compressed again from them (``compress_decoded``).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache

from kvsqueeze.baseline import layer_windows
from kvsqueeze.compat import rope_inverse_frequencies
from kvsqueeze.compression import RecentQueries, compress, compress_decoded, merge_observations
from kvsqueeze.kernels.decode import first_visible
from kvsqueeze.storage.layer import PagedLayer, concat_layer_exports
from kvsqueeze.storage.pool import Workspace

if TYPE_CHECKING:
    from kvsqueeze.compression import Observation
    from kvsqueeze.recipe import Recipe


class CompressedCache(Cache):
    """KV cache that compresses the context with a ``Recipe`` as it is prefilled.

    Every forward pass of more than one token (a prefill chunk) is compressed when it ends, so
    peak KV memory is the budget plus one chunk. Single-token decode steps are stored as they
    come; a recipe's decoding component compresses them every ``every`` steps. ``settings(...)``
    changes that behaviour for a block of code. ``nbytes_peak`` is the largest ``nbytes()`` seen
    at the end of a forward (before its compression).

    Parameters
    ----------
    recipe : what to keep (``Recipe.parse("snapkv@0.75")``); None or ``full`` keeps everything.
    config : the model's config; tells which layers are sliding-window layers. Without it, the
        hooks of ``kvsqueeze.attention.install`` pass it at the first forward.
    block_size : tokens per block of the model's-dtype (or 16-bit) storage; a quantizer's blocks
        hold ``group_size`` tokens (the 16-bit blocks then divide it: ``gcd(block_size, group_size)``).

    Sliding-window layers are stored as transformers stores them, their last ``window - 1``
    tokens, uncompressed, unless the recipe has the ``sliding`` component (``snapkv+sliding@0.75``).
    """

    def __init__(
        self,
        recipe: Recipe | None = None,
        config=None,
        block_size: int = 16,
    ):
        super().__init__(layers=[])
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.recipe = recipe
        self.block_size = block_size
        self.config = None
        self.windows: list[int | None] = []
        self.record_past = False
        self.compress_prefill = True
        self.protect_from: int | None = None
        self.quantize_now = True
        self.defer_compression = False
        self.context_tokens: torch.Tensor | None = None
        self.offsets: torch.Tensor | None = None
        self.observations: dict[int, Observation] = {}
        self.budget_state: dict = {}
        self.unit_ids: torch.Tensor | None = None
        self.workspace = Workspace()
        self.recent_queries: dict[int, RecentQueries] = {}
        self.decode_steps = 0
        self.decode_start: torch.Tensor | None = None
        self.nbytes_peak = 0
        self._decode_step = False
        self._first_visible: tuple | None = None
        self._rope_inv_freq: dict[tuple[torch.device, str | None], torch.Tensor | None] = {}
        if config is not None:
            self.configure(config)

    # ---- model structure ----------------------------------------------------------------------
    def configure(self, config) -> None:
        """Learn from the model's config which layers slide over a window (once)."""
        if self.config is not None:
            return
        self.config = config
        self.windows = layer_windows(config)
        for index, layer in enumerate(self.layers):
            layer.window = self.windows[index]
        if self.recipe is not None and (reason := self.recipe.misses_every_layer(config)):
            warnings.warn(reason, stacklevel=2)

    def recipe_for(self, layer: PagedLayer) -> Recipe | None:
        """The recipe ``layer`` is compressed with: None for a sliding-window layer the recipe
        leaves as it is (one without ``sliding``)."""
        if layer.is_sliding and (self.recipe is None or self.recipe.layers is None):
            return None
        return self.recipe

    def host_of(self, layer: PagedLayer) -> PagedLayer | None:
        """The shallower layer ``layer`` shares merged tokens with (the recipe's cross-layer
        component, ``minicache``), or None."""
        depth = None if self.recipe is None else self.recipe.depth
        if depth is None:
            return None
        host = depth.pairs(self.layer_windows()).get(self.layers.index(layer))
        return None if host is None else self.layers[host]

    def layer_windows(self) -> list[int | None]:
        """Each layer's sliding window (None: full attention); every layer full without a config."""
        return self.windows or [None] * len(self.layers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            index = len(self.layers)
            layer = PagedLayer(self, self.windows[index] if index < len(self.windows) else None)
            layer.record_past = self.record_past
            self.layers.append(layer)
        if self.context_tokens is None:
            batch, device = key_states.shape[0], key_states.device
            self.context_tokens = torch.zeros(batch, dtype=torch.long, device=device)
            self.offsets = torch.zeros(batch, dtype=torch.long, device=device)
        return self.layers[layer_idx].update(key_states, value_states)

    def activate_past_recording(self) -> None:
        """Sliding-window layers keep what slides out of their window until ``crop`` (assisted
        decoding rolls back), including layers the first forward creates."""
        self.record_past = True
        for layer in self.layers:
            layer.activate_past_recording()

    @contextmanager
    def past_recorded(self):
        """Sliding-window layers keep what slides out of their window within the block, so a pass
        that feeds tokens and crops them off again (KVzip's reconstruction) leaves each such layer
        holding the window it had; after the block they let go of what no later query sees."""
        recording = self.record_past
        self.activate_past_recording()
        try:
            yield
        finally:
            self.record_past = recording
            for layer in self.layers:
                layer.record_past = recording
                if layer.is_initialized:
                    layer.after_forward(quantize=False)

    # ---- compression --------------------------------------------------------------------------
    @contextmanager
    def settings(
        self,
        compress_prefill: bool | None = None,
        protect_from: int | None = None,
        quantize_now: bool | None = None,
        defer_compression: bool | None = None,
    ):
        """Temporarily turn prefill compression on/off, protect every slot ``>= protect_from``,
        (``quantize_now=False``) hold every new token in 16 bits until ``settle()``, or
        (``defer_compression=True``) record what each forward observes without compressing,
        its statistics combined with the earlier forwards' (``merge_observations``), until
        ``compress_observed()``.

        Protected tokens (e.g. the question in query-aware mode) are always kept and are not
        counted in the budget. Holding quantization lets a later pass evict before anything is
        quantized, so no block loses tokens after it got its scales. Deferring lets several
        forwards score the same tokens (KVzip's reconstruction chunks) before one compression.
        """
        saved = (self.compress_prefill, self.protect_from, self.quantize_now, self.defer_compression)
        if compress_prefill is not None:
            self.compress_prefill = compress_prefill
        if protect_from is not None:
            self.protect_from = protect_from
        if quantize_now is not None:
            self.quantize_now = quantize_now
        if defer_compression is not None:
            self.defer_compression = defer_compression
        try:
            yield self
        finally:
            self.compress_prefill, self.protect_from, self.quantize_now, self.defer_compression = saved

    def compresses(self, layer: PagedLayer, query_length: int) -> bool:
        """Whether a forward of ``query_length`` new tokens is compressed in ``layer``."""
        recipe = self.recipe_for(layer)
        return query_length > 1 and self.compress_prefill and recipe is not None and recipe.observes

    def first_visible(self, attention_mask: torch.Tensor | None, batch: int, device) -> torch.Tensor | None:
        """``kvsqueeze.kernels.decode.first_visible`` of a decode mask, computed once per mask
        (the model hands every layer of a kind the same mask tensor in a forward)."""
        memo = self._first_visible
        if memo is None or memo[0] is not attention_mask or memo[1] != batch:
            memo = self._first_visible = (attention_mask, batch, first_visible(attention_mask, batch, device))
        return memo[2]

    def decodes(self, layer: PagedLayer) -> bool:
        """Whether ``layer`` is bounded during decoding (its recipe has a decoding component)."""
        recipe = self.recipe_for(layer)
        return recipe is not None and recipe.decoding is not None

    def observe_decode(
        self,
        layer_idx: int,
        query: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        positions: torch.Tensor | None,
    ) -> None:
        """Keep the decode query ``[B, Hq, 1, D]`` of layer ``layer_idx`` for ``compress_decoded``."""
        recent = self.recent_queries.get(layer_idx)
        if recent is None:
            recent = RecentQueries(self.recipe.decoding.observed_queries())
            self.recent_queries[layer_idx] = recent
        slot = self.layers[layer_idx].seen - 1
        if positions is None:
            positions = torch.full((query.shape[0], 1), slot, dtype=torch.long, device=query.device)
        last_row = None if attention_mask is None else attention_mask[:, 0, -1, :]
        recent.add(query, slot, positions.expand(query.shape[0], 1), last_row, scaling)
        self._decode_step = True

    def observe(self, layer_idx: int, observation: Observation) -> None:
        """Record what layer ``layer_idx``'s attention saw during this forward (for ``compress``)."""
        earlier = self.observations.get(layer_idx)
        if earlier is not None and self.defer_compression:
            observation = merge_observations(earlier, observation)
        self.observations[layer_idx] = observation

    def end_forward(self) -> None:
        """After a forward: compress what it observed (a decode step: every ``every`` steps, with
        the decoding component), let sliding layers drop what slid out of their window, and
        quantize full blocks (unless held)."""
        self.nbytes_peak = max(self.nbytes_peak, self.nbytes())
        if self.observations and not self.defer_compression:
            compress(self)
        elif self._decode_step:
            self._count_decode_step()
        self._decode_step = False
        for layer in self.layers:
            if layer.is_initialized:
                layer.after_forward(self.quantize_now)

    def _count_decode_step(self) -> None:
        """A decode step ended: the first one of a row marks where its generated tokens start;
        every ``every`` steps the decoding component compresses."""
        first = self.get_seq_length() - 1
        if self.decode_start is None:
            self.decode_start = torch.full_like(self.context_tokens, first)
        self.decode_start = torch.where(self.decode_start < 0, first, self.decode_start)
        self.decode_steps += 1
        if self.decode_steps % self.recipe.decoding.every == 0:
            compress_decoded(self)

    def compress_observed(self) -> None:
        """Compress with what the forwards run under ``settings(defer_compression=True)`` observed."""
        compress(self)

    def settle(self) -> None:
        """Quantize in every layer the full blocks a quantizer moves out of the 16-bit window."""
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
        """Add ``tokens [B]`` context tokens per row to the budget base.

        A compression step counts the unprotected tokens of its own forward; context fed with
        compression off and compressed later (KVzip's reconstruction pass) is counted here.
        """
        self.context_tokens = self.context_tokens + tokens.to(self.context_tokens.device)

    def rope_inv_freq(self, device: torch.device, layer_idx: int) -> torch.Tensor | None:
        """The RoPE inverse frequencies of layer ``layer_idx`` (computed once per device and layer
        type: Gemma 3's sliding and full layers rotate differently), for scorers."""
        if self.config is None:
            return None
        text_config = self.config.get_text_config(decoder=True)
        layer_types = getattr(text_config, "layer_types", None)
        layer_type = layer_types[layer_idx] if layer_types else None
        if (device, layer_type) not in self._rope_inv_freq:
            inv_freq = rope_inverse_frequencies(text_config, layer_type)
            self._rope_inv_freq[device, layer_type] = None if inv_freq is None else inv_freq.to(device)
        return self._rope_inv_freq[device, layer_type]

    # ---- what is held -------------------------------------------------------------------------
    def _row_tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.context_tokens, self.offsets, self.decode_start) if t is not None]

    def nbytes(self, kv_dtype: torch.dtype | None = None) -> int:
        """Bytes held at rest: every block in use (keys, values, codes, scales, slots, scorer
        state), the block tables and per-head counts, the per-row counters and the decode queries
        a decoding component keeps.

        With ``kv_dtype`` (e.g. ``torch.float16``): the bytes this cache would hold in a model
        running in that dtype — unquantized keys and values at its size; codes, scales, the
        16-bit recent window of a quantizer and slot indices unchanged. Compare with
        ``nbytes_full(kv_dtype)`` for the reduction a 16-bit deployment would see.
        """
        rows = sum(t.numel() * t.element_size() for t in self._row_tensors())
        queries = sum(recent.nbytes() for recent in self.recent_queries.values())
        return rows + queries + sum(layer.nbytes(kv_dtype) for layer in self.layers)

    def nbytes_reserved(self) -> int:
        """Bytes held beyond ``nbytes``, reported apart: the pools' free blocks (slack) and the
        attention's scratch buffers (one layer's gathered keys and values)."""
        return self.workspace.nbytes() + sum(layer.nbytes_reserved() for layer in self.layers)

    def nbytes_full(self, dtype: torch.dtype | None = None) -> int:
        """Bytes transformers' default cache (``DynamicCache(config=...)``) would hold for the same
        tokens: keys + values of every token fed, a sliding-window layer only its last
        ``window - 1``. ``dtype`` defaults to the model's; ``torch.float16`` gives the 16-bit
        reference the papers use."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                batch, heads = layer.dense.count.shape
                held = layer.seen if layer.window is None else min(layer.seen, layer.window - 1)
                fields = layer.dense.pool.fields
                dims = fields["keys"].shape[-1] + fields["values"].shape[-1]
                total += batch * heads * held * dims * (dtype or layer.dtype).itemsize
        return total

    def tokens_kept(self) -> int:
        """Stored (batch, layer, head, token) entries, summed."""
        return sum(layer.tokens_kept() for layer in self.layers)

    def held_tokens(self, row: int) -> int:
        """Stored (layer, head, token) entries of batch row ``row``."""
        return sum(int(layer.held_lengths()[row].sum()) for layer in self.layers if layer.is_initialized)

    def append_blocks(self, row: int) -> int:
        """Blocks batch row ``row`` allocates if one more token is appended (heads whose last
        block is full), summed over layers."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                total += int((layer.dense.count[row] % layer.dense.block_size == 0).sum())
        return total

    @property
    def kv_dtype(self) -> torch.dtype | None:
        return next((layer.dtype for layer in self.layers if layer.is_initialized), None)

    # ---- rows: select, save, stack, split -----------------------------------------------------
    def select_rows(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (any order, repeats allowed) of every layer and row counter."""
        for layer in self.layers:
            layer.select_rows(index)
        if self.offsets is not None:
            index = index.to(self.offsets.device)
            self.offsets, self.context_tokens = self.offsets[index], self.context_tokens[index]
        if self.unit_ids is not None:
            self.unit_ids = self.unit_ids[index.to(self.unit_ids.device)]
        if self.decode_start is not None:
            self.decode_start = self.decode_start[index.to(self.decode_start.device)]
        for recent in self.recent_queries.values():
            recent.select_rows(index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.offsets is not None:
            rows = torch.arange(self.offsets.shape[0], device=self.offsets.device)
            self.select_rows(rows.repeat_interleave(repeats))

    def _clone_empty(self) -> CompressedCache:
        twin = type(self)(self.recipe, block_size=self.block_size)
        twin.config, twin.windows = self.config, list(self.windows)
        return twin

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Named tensors (``"<layer>.<tier>.<field>"``, ``rows.*``) and JSON-able metadata to
        rebuild this cache with ``from_state_dict``; only blocks in use are saved.

        ``budget_state`` is not saved (nor stacked): budgets only keep state within one step.
        """
        tensors = {
            f"{i}.{name}": t for i, layer in enumerate(self.layers) for name, t in layer.export().items()
        }
        tensors["rows.context_tokens"], tensors["rows.offsets"] = self.context_tokens, self.offsets
        meta = {
            "recipe": str(self.recipe or "full"),
            "seen": [layer.seen for layer in self.layers],
            "explicit_slots": [layer.explicit_slots for layer in self.layers],
            "windows": [layer.window for layer in self.layers],
            "dtype": str(self.kv_dtype).removeprefix("torch."),
            "block_size": self.block_size,
        }
        return tensors, meta

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], meta: dict) -> CompressedCache:
        """Rebuild a cache saved with ``state_dict`` (raises ``ValueError`` if inconsistent)."""
        from kvsqueeze.recipe import Recipe

        cache = cls(
            Recipe.parse(meta["recipe"]),
            block_size=meta.get("block_size", 16),
        )
        dtype = getattr(torch, meta["dtype"])
        cache.windows = list(meta.get("windows") or [None] * len(meta["seen"]))
        cache.context_tokens, cache.offsets = tensors["rows.context_tokens"], tensors["rows.offsets"]
        explicit = meta.get("explicit_slots") or [False] * len(meta["seen"])
        for index, seen in enumerate(meta["seen"]):
            prefix = f"{index}."
            fields = {key[len(prefix) :]: t for key, t in tensors.items() if key.startswith(prefix)}
            layer = PagedLayer(cache, cache.windows[index])
            layer.load(fields, seen, dtype, explicit[index])
            layer.validate()
            cache.layers.append(layer)
        return cache

    @classmethod
    def stack(cls, caches: list[CompressedCache]) -> CompressedCache:
        """One batch made of the rows of ``caches`` (same recipe, same model), ends aligned.

        A row that has seen fewer tokens than the longest is shifted right, as left padding
        would: its slots and ``offsets`` grow by the difference, nothing is stored for the gap.
        Pass position ids per row and a 2D mask whose first ``offsets[row]`` columns are 0.
        Blocks are copied into the new cache's pools. A decoding component's step count goes on
        from the largest; its recent decode queries start afresh.
        """
        recipes = {str(cache.recipe) for cache in caches}
        if len(recipes) > 1:
            raise ValueError(f"cannot stack caches made with different recipes: {sorted(recipes)}")
        stacked = caches[0]._clone_empty()
        seen = max(cache.get_seq_length() for cache in caches)
        shifts = [seen - cache.get_seq_length() for cache in caches]
        for layers in zip(*(cache.layers for cache in caches), strict=True):
            explicit = any(layer.explicit_slots for layer in layers)
            exports = []
            for layer, shift in zip(layers, shifts, strict=True):
                if explicit:
                    layer.make_slots_explicit()
                exports.append(layer.export())
                if explicit and shift:
                    shift_slots(exports[-1], shift)
            layer = PagedLayer(stacked, layers[0].window)
            layer.load(concat_layer_exports(exports), seen, layers[0].dtype, explicit)
            stacked.layers.append(layer)
        stacked.offsets = torch.cat(
            [cache.offsets + shift for cache, shift in zip(caches, shifts, strict=True)]
        )
        stacked.context_tokens = torch.cat([cache.context_tokens for cache in caches])
        stacked.decode_steps = max(cache.decode_steps for cache in caches)  # the batch's compression cadence
        if any(cache.decode_start is not None for cache in caches):
            stacked.decode_start = torch.cat(
                [cache._decode_start_shifted(shift) for cache, shift in zip(caches, shifts, strict=True)]
            )
        return stacked

    def _decode_start_shifted(self, shift: int) -> torch.Tensor:
        """``decode_start`` with its rows' slots moved by ``shift`` (-1: the row has not decoded)."""
        if self.decode_start is None:
            return torch.full_like(self.context_tokens, -1)
        return torch.where(self.decode_start >= 0, self.decode_start + shift, -1)

    def split(self) -> list[CompressedCache]:
        """The inverse of ``stack``: one single-row cache per batch row, offsets removed."""
        rows = []
        for row in range(self.offsets.shape[0]):
            single = self._clone_empty()
            shift = int(self.offsets[row])
            for layer in self.layers:
                exported = layer.export(rows=torch.tensor([row], device=self.offsets.device))
                if layer.explicit_slots and shift:
                    shift_slots(exported, -shift)
                copy = PagedLayer(single, layer.window)
                copy.load(exported, layer.seen - shift, layer.dtype, layer.explicit_slots)
                single.layers.append(copy)
            single.offsets = torch.zeros_like(self.offsets[row : row + 1])
            single.context_tokens = self.context_tokens[row : row + 1].clone()
            if self.decode_start is not None:
                single.decode_start = self._decode_start_shifted(-shift)[row : row + 1]
            single.decode_steps = self.decode_steps
            rows.append(single)
        return rows


def shift_slots(exported: dict[str, torch.Tensor], shift: int) -> None:
    """Add ``shift`` to the stored slots of an exported layer (in place)."""
    for key in exported:
        if key.endswith(".token.slots"):
            exported[key] = torch.where(exported[key] >= 0, exported[key] + shift, exported[key])
