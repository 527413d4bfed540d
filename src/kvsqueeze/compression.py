"""The compression steps: what the attention function observed -> scores -> budgets -> keep.

A forward that the cache compresses (a prefill chunk with a recipe that evicts or merges
layers) runs its attention as usual; the attention function only records, per layer, what the
recipe's components ask for (``Observation``: the last queries, attention statistics over every
query). When the forward ends, ``compress`` scores every layer from its held tokens and its
observation, lets the budget share the kept tokens across heads and layers (``Recipe.rank`` then
``Recipe.select``), merges what is dropped into kept tokens if the recipe merges, and keeps the
selected tokens. Layers are scored one at a time: only their rankings (and, with a merge, their
views) stay in memory until the budget has seen every layer. A cross-layer component
(``minicache``) then merges the tokens of paired adjacent layers (``merge_across_layers``).

During decoding, a recipe's decoding component bounds the cache: the attention function keeps
each layer's latest decode queries (``RecentQueries``) and every ``every`` steps
``compress_decoded`` keeps, per head, the component's ``target`` best held tokens (without
merging: a recipe's merge applies to the compression of prefill forwards only).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvsqueeze.scorers.base import ScoringInputs
from kvsqueeze.selection import keep_mask
from kvsqueeze.storage.tiers import GUEST_NORMS

if TYPE_CHECKING:
    from kvsqueeze.budgets.base import LayerRanking
    from kvsqueeze.cache import CompressedCache
    from kvsqueeze.depth import MiniCache
    from kvsqueeze.mergers.base import Merger
    from kvsqueeze.storage.layer import LayerView, PagedLayer


@dataclass
class Observation:
    """What one layer's attention recorded during a forward to be compressed.

    ``queries [B, Hq, w, D]`` are the last ``w`` post-RoPE queries (``w`` = what the recipe asks
    for), at RoPE positions ``query_positions [B, w]`` and slots ``query_slots [B, w]``;
    ``last_row [B, T]`` is the model's mask for the forward's last query over slots (None: no
    mask, every held token is visible); ``statistics`` maps a ``ScoringInputs`` statistic name
    (``attention_mass``, ``attention_peak``) to its value over *every* query of the forward,
    indexed by slot, ``[B, Hkv, n_rep, T]``; ``new_slots`` are the slots of the forward's tokens.
    """

    queries: torch.Tensor
    query_positions: torch.Tensor
    query_slots: torch.Tensor
    scaling: float
    last_row: torch.Tensor | None
    new_slots: range
    statistics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class RecentQueries:
    """One layer's latest ``capacity`` decode queries, in a ring written once per decode step.

    ``queries [B, Hq, capacity, D]``, their RoPE ``positions`` and ``slots`` ``[B, capacity]``;
    ``last_row [B, T]`` is the model's mask row at the latest step (None: nothing masked).
    """

    capacity: int
    queries: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    last_row: torch.Tensor | None = None
    scaling: float = 1.0
    written: int = 0

    def add(
        self,
        query: torch.Tensor,
        slot: int,
        positions: torch.Tensor,
        last_row: torch.Tensor | None,
        scaling: float,
    ) -> None:
        """Record the decode query ``[B, Hq, 1, D]`` of the token at ``slot``."""
        batch, heads, _, dim = query.shape
        if self.queries is None or self.queries.shape[0] != batch:
            self.queries = query.new_zeros(batch, heads, self.capacity, dim)
            self.positions = positions.new_zeros(batch, self.capacity)
            self.slots = positions.new_zeros(batch, self.capacity)
            self.written = 0
        at = self.written % self.capacity
        self.queries[:, :, at] = query[:, :, 0]
        self.positions[:, at] = positions[:, 0]
        self.slots[:, at] = slot
        self.last_row, self.scaling = last_row, scaling
        self.written += 1

    def select_rows(self, index: torch.Tensor) -> None:
        if self.queries is not None:
            index = index.to(self.queries.device)
            self.queries, self.positions, self.slots = (
                self.queries[index],
                self.positions[index],
                self.slots[index],
            )
            self.last_row = None if self.last_row is None else self.last_row[index]

    def nbytes(self) -> int:
        held = (self.queries, self.positions, self.slots)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def observation(self) -> Observation:
        """The recorded queries in the order they came, as an ``Observation``."""
        count = min(self.written, self.capacity)
        order = (torch.arange(count, device=self.queries.device) + self.written - count) % self.capacity
        last_row = self.last_row
        if last_row is not None and last_row.dtype != torch.bool:
            last_row = last_row > torch.finfo(last_row.dtype).min / 2
        return Observation(
            queries=self.queries[:, :, order],
            query_positions=self.positions[:, order],
            query_slots=self.slots[:, order],
            scaling=self.scaling,
            last_row=last_row,
            new_slots=range(int(self.slots[0, order[-1]]), int(self.slots[0, order[-1]]) + 1),
        )


COMBINED_OVER_FORWARDS = {"attention_mass": torch.add, "attention_peak": torch.maximum}
"""How a statistic of several forwards combines at one slot: the masses add up, the peak is the
largest of the peaks."""


def merge_observations(earlier: Observation, later: Observation) -> Observation:
    """``later`` with each statistic combined with ``earlier``'s (``COMBINED_OVER_FORWARDS``) over
    the slots both forwards held; past those, ``later``'s values (a reconstruction pass crops each
    copy before the next, so only the context's slots are held by both)."""
    statistics = {}
    for name, statistic in later.statistics.items():
        before = earlier.statistics[name]
        shared = min(before.shape[-1], statistic.shape[-1])
        merged = statistic.clone()
        merged[..., :shared] = COMBINED_OVER_FORWARDS[name](before[..., :shared], statistic[..., :shared])
        statistics[name] = merged
    return dataclasses.replace(later, statistics=statistics)


def visible_to_last_query(observation: Observation, slots: torch.Tensor) -> torch.Tensor:
    """``[B, Hkv, L]`` bool: held candidates the forward's last query could see (padding and
    tokens outside a sliding window are dead weight)."""
    held = slots >= 0
    if observation.last_row is None:
        return held
    row = observation.last_row
    index = slots.clamp(min=0, max=row.shape[-1] - 1)
    return held & row[:, None, :].expand(-1, slots.shape[1], -1).gather(-1, index)


def statistic_at(statistic: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """A recorded statistic ``[B, Hkv, n_rep, T]`` (by slot) at ``slots [B, Hkv, L]``; 0 where
    nothing is held."""
    index = slots.clamp(min=0, max=statistic.shape[-1] - 1)[:, :, None, :]
    picked = statistic.gather(-1, index.expand(-1, -1, statistic.shape[2], -1))
    return picked.masked_fill(slots[:, :, None] < 0, 0.0)


def scoring_inputs(
    cache: CompressedCache, index: int, view: LayerView, observation: Observation
) -> ScoringInputs:
    """The ``ScoringInputs`` of layer ``index`` (before the budget fields are set)."""
    config = cache.config
    observed = {name: statistic_at(stat, view.slots) for name, stat in observation.statistics.items()}
    return ScoringInputs(
        keys=view.keys,
        values=view.values,
        slots=view.slots,
        valid=visible_to_last_query(observation, view.slots),
        queries=observation.queries,
        query_positions=observation.query_positions,
        query_slots=observation.query_slots,
        scaling=observation.scaling,
        layer_idx=index,
        num_layers=config.num_hidden_layers if config is not None else len(cache.layers),
        rope_inv_freq=cache.rope_inv_freq(view.keys.device, index),
        previous_scores=view.scores,
        config=config,
        units=cache.units_of(view.slots),
        observed=observed,
    )


def new_context_tokens(cache: CompressedCache, observed: list[tuple[int, Observation]]) -> torch.Tensor:
    """``[B]`` context tokens the forward added per row: its tokens that are neither padding nor
    protected, read off the mask row of a full-attention layer (a sliding layer's hides what is
    outside its window)."""
    observation = next((obs for i, obs in observed if cache.layers[i].window is None), observed[0][1])
    fed = observation.new_slots
    slots = torch.arange(fed.start, fed.stop, device=observation.queries.device)
    real = torch.ones(observation.queries.shape[0], len(fed), dtype=torch.bool, device=slots.device)
    if observation.last_row is not None:
        real = observation.last_row[:, fed.start : fed.stop]
    if cache.protect_from is not None:
        real = real & (slots < cache.protect_from)
    return real.sum(-1)


def budget_base(cache: CompressedCache, layer: PagedLayer) -> torch.Tensor:
    """``[B]`` what a layer's ratio applies to: the context tokens seen, or for a sliding-window
    layer at most the ``window - 1`` tokens transformers' own cache holds for it (a ratio is a
    fraction of what the full cache holds, and a budget beyond the window would be spent by
    ``global`` on the full-attention layers)."""
    if layer.window is None:
        return cache.context_tokens
    return cache.context_tokens.clamp(max=layer.window - 1)


def compress(cache: CompressedCache) -> None:
    """Compress every layer the last forward observed, with the cache's recipe (see module doc)."""
    recipe = cache.recipe
    observed = sorted(cache.observations.items())
    cache.observations = {}
    if recipe is None or not observed:
        return
    if recipe.keys is not None and recipe.keys.needs_queries:
        for index, observation in observed:
            layer = cache.layers[index]
            layer.set_head_state(recipe.keys.observe(observation.queries, layer.dense.count.shape[1]))
    if recipe.evicts:
        evict(cache, observed)
    if recipe.depth is not None:
        merge_across_layers(cache, recipe.depth, {index for index, _ in observed})


def evict(cache: CompressedCache, observed: list[tuple[int, Observation]]) -> None:
    """Score, budget, merge (if the recipe merges) and keep in every observed layer."""
    recipe = cache.recipe
    demotes = recipe.quantizer is not None and recipe.quantizer.demotes
    cache.count_context(new_context_tokens(cache, observed))
    rankings, views = [], []
    for index, observation in observed:
        layer: PagedLayer = cache.layers[index]
        view = layer.view()
        inputs = scoring_inputs(cache, index, view, observation)
        protected = torch.zeros_like(inputs.valid)
        if cache.protect_from is not None:
            protected = inputs.valid & (view.slots >= cache.protect_from)
        if demotes:  # quantized tokens were demoted or kept once: never decided again
            protected = protected | (inputs.valid & ~view.in_dense)
        rankings.append(recipe.rank(inputs, budget_base(cache, layer), protected, cache.budget_state))
        # a merge reads the layer's keys/values once select has decided (every layer's then stay
        # in memory until the budget has seen them all); without one they are freed right away
        views.append(view if recipe.merge is not None else view.release())
    for view, ranking, keep in zip(views, rankings, recipe.select(rankings, cache.budget_state), strict=True):
        layer = cache.layers[ranking.layer_idx]
        if recipe.merge is not None:
            merge_dropped(layer, view, ranking, keep, recipe.merge)
        layer.keep(view, keep, ranking.scorer_state, demote=ranking.valid if demotes else None)


def merge_dropped(
    layer: PagedLayer, view: LayerView, ranking: LayerRanking, keep: torch.Tensor, merge: Merger
) -> None:
    """Fold what ``keep [B, Hkv, L]`` drops into kept tokens with ``merge`` and write the merged
    keys/values into ``layer``'s storage (before ``keep`` drops the rest). Only kept tokens still
    in 16-bit storage absorb others: a quantized token is never re-encoded. Tokens the last query
    cannot see (outside a sliding window) are not merged into what it can."""
    dropped = ranking.valid & (view.slots >= 0) & ~keep
    into = keep & view.in_dense
    if not bool(dropped.any()):
        return
    keys, values, absorbed = merge.merge(view.keys, view.values, keep, dropped, into, ranking.ranking)
    layer.rewrite(view, {"keys": keys, "values": values}, absorbed)


def merge_across_layers(cache: CompressedCache, depth: MiniCache, observed: set[int]) -> None:
    """Merge, in every pair of layers ``depth`` pairs whose layers the forward observed, the
    tokens both hold in 16-bit storage (``MiniCache``): the host stores the shared states and the
    deeper layer's magnitudes, the deeper layer drops its copies. Protected tokens stay apart."""
    for guest_index, host_index in depth.pairs(cache.layer_windows()).items():
        if guest_index in observed and host_index in observed:
            merge_pair(cache, depth, cache.layers[host_index], cache.layers[guest_index])


def merge_pair(cache: CompressedCache, depth: MiniCache, host: PagedLayer, guest: PagedLayer) -> None:
    """``merge_across_layers`` for one pair."""
    host_view, guest_view = host.view(), guest.view()
    if host_view.slots.shape[-1] == 0:
        return
    index, found = align_slots(host_view.slots, guest_view.slots)
    candidates = found & guest_view.in_dense & host_view.in_dense.gather(2, index)
    if cache.protect_from is not None:
        candidates = candidates & (guest_view.slots < cache.protect_from)
    if not bool(candidates.any()):
        return
    host_states = tuple(
        t.gather(2, index[..., None].expand(-1, -1, -1, t.shape[-1]))
        for t in (host_view.keys, host_view.values)
    )
    keys, values, key_norms, value_norms, merged = depth.merge(
        host_states, (guest_view.keys, guest_view.values), candidates
    )
    length = host_view.slots.shape[-1]
    target = torch.where(merged, index, length)  # unmerged entries write to a column cut off below

    def to_host(merged_values: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        padded = torch.cat([base, base[:, :, :1]], dim=2)
        where = target.view(*target.shape, *[1] * (merged_values.dim() - 3)).expand_as(merged_values)
        return padded.scatter(2, where, merged_values.to(base.dtype))[:, :, :length]

    norms = torch.zeros_like(host_view.slots, dtype=torch.float32)
    fields = {
        "keys": to_host(keys, host_view.keys),
        "values": to_host(values, host_view.values),
        GUEST_NORMS[0]: to_host(key_norms, norms),
        GUEST_NORMS[1]: to_host(value_norms, norms),
    }
    # the guest first: its keep maps the view back over the host's entries as they were when it was taken
    guest.keep(guest_view.release(), ~merged)
    host.rewrite(host_view, fields, to_host(merged, torch.zeros_like(host_view.in_dense)))


def align_slots(host_slots: torch.Tensor, guest_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each entry of ``guest_slots [B, H, Lg]``, the index of the ``host_slots [B, H, Lh]``
    entry with the same slot (both in slot order, ``-1`` padding last) and whether there is one."""
    sortable = torch.where(host_slots >= 0, host_slots, torch.iinfo(torch.long).max)
    index = torch.searchsorted(sortable, guest_slots.clamp(min=0)).clamp(max=host_slots.shape[-1] - 1)
    found = (host_slots.gather(2, index) == guest_slots) & (guest_slots >= 0)
    return index, found


def compress_decoded(cache: CompressedCache) -> None:
    """Keep, in every layer with recorded decode queries, the decoding component's ``target``
    best candidates per head: the generated tokens if it is ``frozen`` (the prompt is kept),
    else every held token. Layers already within their target are left as they are, unless the
    component is ``stateful``: its per-token state is updated from every period's queries."""
    component = cache.recipe.decoding
    for index, recent in sorted(cache.recent_queries.items()):
        if recent.written == 0:
            continue
        layer: PagedLayer = cache.layers[index]
        observation = recent.observation()
        view = layer.view()
        inputs = scoring_inputs(cache, index, view, observation)
        inputs.previous_scores = view.scores if component.stateful else None
        candidates = inputs.valid
        if component.frozen:
            candidates = candidates & (view.slots >= cache.decode_start[:, None, None])
            counted = layer.seen - cache.decode_start
        elif observation.last_row is not None:
            counted = observation.last_row.sum(-1)
        else:
            counted = layer.seen - cache.offsets
        target = component.target(counted.to(inputs.valid.device))[:, None]
        if not (component.stateful or bool((candidates.sum(-1) > target).any())):
            continue
        protected = inputs.valid & ~candidates
        inputs.budget, inputs.protected = target.expand(candidates.shape[:2]), protected
        # protected tokens are kept apart: a scorer's own NEVER_EVICT tokens must not outrank them
        ranking, state = component.rank(inputs)
        keep = protected | keep_mask(ranking, candidates, target)
        layer.keep(view.release(), keep, state)
