"""``Recipe``: the composition unit (scorer + budget + quantizer + ratio), its string form, selection.

String form: ``full``, or components joined by ``+`` and an optional ``@RATIO``, where RATIO is
the fraction of context tokens removed, in [0, 1): ``snapkv@0.75``, ``streaming:sinks=4@0.9``,
``snapkv+adakv@0.8``, ``snapkv+kivi2@0.5``, ``kvzip+words@0.75``, ``snapkv+d2o@0.5``,
``snapkv+sliding@0.75`` (sliding-window layers compressed too). Each component is
``name[:option=value,...]``; at most one scorer, one budget, one unit, one merge, one cross-layer
component (``minicache``), one key reducer (fewer numbers stored per key), one quantizer and one
decoding component, which bounds the cache during generation and may follow the ratio:
``kvzip+global+think:channels=0.5+kivi4@0.75+decode:scorer=tova,budget=256,every=32``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from kvsqueeze.baseline import layer_windows
from kvsqueeze.budgets import BUDGETS
from kvsqueeze.budgets.base import Budget, LayerRanking
from kvsqueeze.components import Component
from kvsqueeze.decoding import DECODERS
from kvsqueeze.decoding.base import DecodeCompressor
from kvsqueeze.depth import DEPTH, MiniCache
from kvsqueeze.keys import KEY_REDUCERS
from kvsqueeze.keys.base import KeyReducer, PlainBlocks, ReducedKeys
from kvsqueeze.mergers import MERGERS
from kvsqueeze.mergers.base import Merger
from kvsqueeze.prefill import ChunkedPrefill, PrefillStrategy, ReconstructionPrefill
from kvsqueeze.quantizers import QUANTIZERS
from kvsqueeze.quantizers.base import Quantizer
from kvsqueeze.scorers import SCORERS
from kvsqueeze.scorers.base import Scorer, ScoringInputs
from kvsqueeze.selection import keep_mask
from kvsqueeze.sliding import LAYER_CHOICES, SlidingLayers
from kvsqueeze.units import UNITS, Unit, pool_by_unit

FULL = "full"


class RecipeError(ValueError):
    """A recipe string or value that cannot be used; the message says what would be valid."""


def components() -> dict[str, type[Component]]:
    return {
        **SCORERS,
        **BUDGETS,
        **UNITS,
        **MERGERS,
        **DEPTH,
        **KEY_REDUCERS,
        **QUANTIZERS,
        **DECODERS,
        **LAYER_CHOICES,
    }


def valid_names() -> list[str]:
    return [FULL, *components()]


@dataclass
class Recipe:
    """What to keep of the context and how to store it.

    Parameters
    ----------
    scorer : importance scorer (None keeps every token).
    ratio : fraction of context tokens removed, in [0, 1). Tokens protected by the cache (the
        question in query-aware mode) are kept on top of the budget.
    budget : how the kept tokens are shared across layers and heads (None = uniform).
    unit : groups of tokens kept or dropped together, e.g. whole words (None = single tokens).
    merge : folds what the scorer evicts into the kept tokens (None = evicted tokens are lost).
    depth : adjacent layers share their states of a token (None = every layer stores its own).
    quantizer : packed low-bit storage of the kept tokens (None = the model's dtype).
    decoding : what bounds the cache while an answer is generated (None = every generated token
        is kept).
    keys : what stores each encoded block's keys in fewer numbers (None = every channel).
    layers : ``SlidingLayers`` to compress sliding-window layers too (None = full-attention layers
        only; a sliding layer holds its window as in transformers' own cache).
    """

    scorer: Scorer | None = None
    ratio: float = 0.0
    budget: Budget | None = None
    quantizer: Quantizer | None = None
    unit: Unit | None = None
    decoding: DecodeCompressor | None = None
    merge: Merger | None = None
    keys: KeyReducer | None = None
    layers: SlidingLayers | None = None
    depth: MiniCache | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise RecipeError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.scorer is None and self.budget is not None:
            self.scorer = self.budget.default_scorer()  # `duo` alone ranks its streaming heads itself
        if self.scorer is None and (self.ratio > 0 or self.budget is not None):
            raise RecipeError("a ratio or a budget needs a scorer to choose what to remove, e.g. snapkv@0.5")
        if self.unit is not None and self.scorer is None:
            name = self.unit.name
            raise RecipeError(f"{name} groups what a scorer keeps; add a scorer, e.g. kvzip+{name}@0.75")
        if self.merge is not None and self.scorer is None:
            name = self.merge.name
            raise RecipeError(f"{name} merges what a scorer evicts; add a scorer, e.g. snapkv+{name}@0.5")
        if self.merge is not None and self.quantizer is not None and self.quantizer.demotes:
            raise RecipeError(
                f"{self.quantizer.name} keeps what the scorer evicts in low bits: there is nothing "
                f"left for {self.merge.name} to merge; use one of them"
            )
        if self.layers is not None and self.scorer is None and self.is_full:
            raise RecipeError(
                f"{self.layers.name} applies a recipe to sliding-window layers too; add what to "
                f"apply, e.g. snapkv+{self.layers.name}@0.75"
            )

    @property
    def evicts(self) -> bool:
        """Whether prefill drops tokens (a scorer with a ratio, or a budget with its own counts)."""
        if self.scorer is None:
            return False
        return self.ratio > 0 or (self.budget is not None and self.budget.sets_own_counts)

    @property
    def observes(self) -> bool:
        """Whether a prefill forward records an ``Observation`` (to evict, to merge across layers,
        or for a key reducer that reads the queries)."""
        return self.evicts or self.depth is not None or (self.keys is not None and self.keys.needs_queries)

    @property
    def encodes_blocks(self) -> bool:
        """Whether older tokens are encoded into blocks (a quantizer or a key reducer)."""
        return self.quantizer is not None or self.keys is not None

    def block_codecs(self, key_dim: int) -> list[Quantizer]:
        """The codecs of a layer's encoded tiers, in ``Quantizer.tiers`` order, for keys of
        ``key_dim`` channels (none: every token stays in the 16-bit or model-dtype tier)."""
        if not self.encodes_blocks:
            return []
        tiers = [PlainBlocks()] if self.quantizer is None else self.quantizer.tiers()
        if self.keys is None:
            return tiers
        return [ReducedKeys(self.keys, codec, key_dim) for codec in tiers]

    @property
    def reconstructs(self) -> bool:
        """Whether the context is compressed on a reconstruction pass (KVzip) after its prefill."""
        return self.evicts and self.scorer.reconstructs

    @property
    def is_full(self) -> bool:
        return not self.evicts and not self.encodes_blocks and self.decoding is None and self.depth is None

    def misses_every_layer(self, config) -> str | None:
        """Why this recipe would compress no layer of a model with ``config`` (every layer slides
        over a window and the recipe lacks ``sliding``), or None if it compresses some."""
        if self.is_full or self.layers is not None:
            return None
        windows = layer_windows(config)
        if any(window is None for window in windows):
            return None
        return (
            f"recipe {self} compresses no layer of this model: all {len(windows)} layers are "
            f"sliding-window layers (window {max(windows)}), which a recipe leaves as transformers' "
            f"own cache holds them; add {SlidingLayers.name!r} to compress them too, e.g. "
            f"{Recipe.parse(str(self) + '+' + SlidingLayers.name)}"
        )

    def __str__(self) -> str:
        implied = self.budget is not None and self.scorer == self.budget.default_scorer()
        scorer = None if implied else self.scorer  # `duo` rather than `streaming+duo`
        named = (
            scorer,
            self.budget,
            self.unit,
            self.merge,
            self.depth,
            self.keys,
            self.quantizer,
            self.layers,
        )
        parts = [c.spec() for c in named if c is not None]
        text = "+".join(parts) + (f"@{self.ratio:g}" if self.ratio > 0 else "")
        if self.decoding is not None:
            text = "+".join(filter(None, (text, self.decoding.spec())))
        return text or FULL

    @classmethod
    def parse(cls, text: str) -> Recipe:
        """Parse a recipe string; raise ``RecipeError`` naming what would be valid."""
        text = text.strip()
        if text == FULL:
            return cls()
        body, ratio_text = _split_ratio(text)
        chosen: dict[str, Component] = {}
        for part in body.split("+"):
            component = _build_component(part.strip())
            if component.kind in chosen:
                raise RecipeError(f"recipe {text!r} has two {component.kind}s; use at most one of each")
            chosen[component.kind] = component
        if ratio_text:
            try:
                ratio = float(ratio_text)
            except ValueError:
                raise RecipeError(f"ratio {ratio_text!r} in {text!r} is not a number") from None
        else:
            ratio = 0.0
        recipe = cls(
            scorer=chosen.get("scorer"),
            ratio=ratio,
            budget=chosen.get("budget"),
            quantizer=chosen.get("quantizer"),
            unit=chosen.get("unit"),
            decoding=chosen.get("decoding"),
            merge=chosen.get("merge"),
            keys=chosen.get("keys"),
            layers=chosen.get("layers"),
            depth=chosen.get("depth"),
        )
        decoder = recipe.decoding
        if recipe.scorer is not None and recipe.scorer.stateful and decoder is not None and decoder.stateful:
            raise RecipeError(
                f"recipe {text!r} pairs two stateful components ({recipe.scorer.name}, "
                f"{decoder.name}): they would share each token's stored state; use one"
            )
        if recipe.scorer is not None and not ratio_text and not recipe.evicts:
            raise RecipeError(f"recipe {text!r} needs a ratio after '@', e.g. {body}@0.5")
        return recipe

    def observed_queries(self) -> int:
        """How many of a compressed forward's last queries the attention function must record."""
        components = (self.scorer, self.budget, self.keys)
        return max((c.observed_queries() for c in components if c is not None), default=0)

    def prefill_strategy(self, tokenizer: PreTrainedTokenizerBase | None = None) -> PrefillStrategy:
        """How a context is fed to a cache of this recipe (``kvsqueeze.prefill``)."""
        if self.reconstructs:
            return ReconstructionPrefill(tokenizer, self.scorer.chunk)
        return ChunkedPrefill(tokenizer)

    def keep_counts(self, context_tokens: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
        """Tokens each ``[B, Hkv]`` head keeps: protected ones plus ``(1 - ratio)`` of the context."""
        budget = torch.ceil((1.0 - self.ratio) * context_tokens.double()).long()
        return protected.sum(-1) + budget[:, None]

    def rank(
        self, inputs: ScoringInputs, context_tokens: torch.Tensor, protected: torch.Tensor, state: dict
    ) -> LayerRanking:
        """Rank one layer's candidates and set its per-head counts (before ``select``).

        ``context_tokens [B]`` counts the context tokens seen so far per row (the budget base);
        ``protected [B, Hkv, L]`` marks candidates that are always kept; ``state`` is the cache's
        private dict for the budget.
        """
        counts = self.keep_counts(context_tokens, protected)
        inputs.budget, inputs.protected, inputs.context_tokens = counts, protected, context_tokens
        ranking, scorer_state = self.scorer.rank(inputs)
        if self.unit is not None:
            if inputs.units is None:
                raise ValueError(
                    f"{self.unit.name} needs each context token's unit: prefill the context with "
                    "kvsqueeze.engine.prefill_context (or CompressedCache.set_units)"
                )
            ranking = pool_by_unit(ranking, inputs.units, inputs.valid)
        if self.budget is not None:
            ranking, counts = self.budget.allocate(ranking, inputs, counts, state)
        ranking = ranking.masked_fill(protected, math.inf)
        return LayerRanking(inputs.layer_idx, ranking, inputs.valid, protected, counts, scorer_state)

    def select(self, layers: list[LayerRanking], state: dict) -> list[torch.Tensor]:
        """Keep masks ``[B, Hkv, L]``, one per ranked layer, once the budget has seen them all."""
        if self.budget is not None:
            self.budget.across_layers(layers, state)
        return [keep_mask(layer.ranking, layer.valid, layer.counts) for layer in layers]


def split_recipes(text: str) -> list[str]:
    """Split a comma-separated list of recipes; a comma followed by ``option=`` continues the
    options of the recipe before it (``snapkv:window=64,kernel_size=5@0.5,full`` is two)."""
    recipes: list[str] = []
    for piece in (part.strip() for part in text.split(",")):
        if recipes and re.match(r"\w+=", piece) and ":" in recipes[-1].rpartition("+")[2]:
            recipes[-1] += "," + piece
        elif piece:
            recipes.append(piece)
    return recipes


def _split_ratio(text: str) -> tuple[str, str]:
    """``(components, ratio text)`` of a recipe string: the ratio is the ``@...`` that ends the
    last component it follows (``a+b@0.5`` or ``a+b@0.5+decode:...``); ``""`` if there is none."""
    match = re.search(r"@([^+]*)", text)
    if match is None:
        return text, ""
    if "@" in text[match.end() :]:
        raise RecipeError(f"recipe {text!r} has two ratios; give one '@RATIO'")
    return text[: match.start()] + text[match.end() :], match.group(1)


def _build_component(spec: str) -> Component:
    name, _, options_text = spec.partition(":")
    name = name.strip()
    registry = components()
    if name == FULL:
        raise RecipeError(f"{FULL!r} keeps everything and stands alone; it combines with no component")
    if name not in registry:
        hint = difflib.get_close_matches(name, valid_names(), n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise RecipeError(f"unknown method {name!r}{suggestion}; valid names: {', '.join(valid_names())}")
    component_cls = registry[name]
    fields = (
        {f.name for f in dataclasses.fields(component_cls)}
        if dataclasses.is_dataclass(component_cls)
        else set()
    )
    defaults = component_cls().options()
    values = {}
    for item in filter(None, (part.strip() for part in options_text.split(","))):
        key, eq, raw = item.partition("=")
        if not eq or key not in fields:
            known = ", ".join(f"{k}=<value>" for k in defaults) or "none"
            raise RecipeError(f"bad option {item!r} for {name}; options: {known}")
        values[key] = _convert(raw, type(defaults[key]), f"{name}:{key}")
    try:
        return component_cls(**values)
    except ValueError as error:  # out of range (bits=3, window=-3); the message names the option
        raise RecipeError(str(error)) from None


def _convert(raw: str, kind: type, where: str):
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise RecipeError(f"{where} takes true/false, got {raw!r}")
    try:
        return kind(raw)
    except ValueError:
        raise RecipeError(f"{where} takes a {kind.__name__}, got {raw!r}") from None
