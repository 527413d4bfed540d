"""``Recipe``: the composition unit (scorer + ratio), its string form, and token selection.

String form: ``full``, or ``NAME[:opt=value,...]@RATIO`` where RATIO is the fraction of context
tokens removed, in [0, 1): ``snapkv@0.75``, ``streaming:sinks=4@0.9``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass

import torch

from kvsqueeze.scorers import SCORERS
from kvsqueeze.scorers.base import Scorer, ScoringInputs
from kvsqueeze.selection import keep_mask

FULL = "full"


class RecipeError(ValueError):
    """A recipe string or value that cannot be used; the message says what would be valid."""


def valid_names() -> list[str]:
    return [FULL, *SCORERS]


@dataclass
class Recipe:
    """What to keep of the context: a scorer and the fraction of context tokens to remove.

    Parameters
    ----------
    scorer : importance scorer (None keeps everything).
    ratio : fraction of context tokens removed, in [0, 1). Tokens protected by the cache (the
        question in query-aware mode) are kept on top of the budget.
    """

    scorer: Scorer | None = None
    ratio: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise RecipeError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.scorer is None and self.ratio > 0:
            raise RecipeError("a ratio above 0 needs a scorer to choose what to remove")

    @property
    def is_full(self) -> bool:
        return self.scorer is None or self.ratio == 0.0

    def __str__(self) -> str:
        if self.scorer is None:
            return FULL
        defaults = type(self.scorer)()
        changed = [
            f"{f.name}={getattr(self.scorer, f.name)}"
            for f in dataclasses.fields(self.scorer)
            if getattr(self.scorer, f.name) != getattr(defaults, f.name)
        ]
        options = ":" + ",".join(changed) if changed else ""
        return f"{self.scorer.name}{options}@{self.ratio:g}"

    @classmethod
    def parse(cls, text: str) -> Recipe:
        """Parse ``full`` or ``name[:opt=value,...]@ratio``; raise ``RecipeError`` with the valid names."""
        text = text.strip()
        if text == FULL:
            return cls()
        body, at, ratio_text = text.rpartition("@")
        if not at:
            body, ratio_text = text, ""
        name, _, options_text = body.partition(":")
        scorer = _build_scorer(name.strip(), options_text)
        if not ratio_text:
            raise RecipeError(f"recipe {text!r} needs a ratio after '@', e.g. {name}@0.5")
        try:
            ratio = float(ratio_text)
        except ValueError:
            raise RecipeError(f"ratio {ratio_text!r} in {text!r} is not a number") from None
        return cls(scorer=scorer, ratio=ratio)

    def keep_counts(self, context_tokens: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
        """Tokens each ``[B, Hkv]`` head keeps: protected ones plus ``(1 - ratio)`` of the context."""
        budget = torch.ceil((1.0 - self.ratio) * context_tokens.double()).long()
        return protected.sum(-1) + budget[:, None]

    def select(
        self, inputs: ScoringInputs, context_tokens: torch.Tensor, protected: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Keep mask ``[B, Hkv, L]`` and the scorer state to store (stateful scorers only).

        ``context_tokens [B]`` counts the context tokens seen so far per row (the budget base);
        ``protected [B, Hkv, L]`` marks candidates that are always kept.
        """
        counts = self.keep_counts(context_tokens, protected)
        inputs.budget = counts
        ranking, state = self.scorer.rank(inputs)
        ranking = ranking.masked_fill(protected, math.inf)
        return keep_mask(ranking, inputs.valid, counts), state


def _build_scorer(name: str, options_text: str) -> Scorer:
    if name not in SCORERS:
        hint = difflib.get_close_matches(name, valid_names(), n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise RecipeError(f"unknown method {name!r}{suggestion}; valid names: {', '.join(valid_names())}")
    scorer_cls = SCORERS[name]
    fields = {f.name: f for f in dataclasses.fields(scorer_cls)}
    values = {}
    for item in filter(None, (part.strip() for part in options_text.split(","))):
        key, eq, raw = item.partition("=")
        if not eq or key not in fields:
            known = ", ".join(f"{k}=<value>" for k in fields) or "none"
            raise RecipeError(f"bad option {item!r} for {name}; options: {known}")
        values[key] = _convert(raw, type(getattr(scorer_cls(), key)), f"{name}:{key}")
    return scorer_cls(**values)


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
