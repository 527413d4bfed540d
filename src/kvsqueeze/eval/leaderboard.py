"""The leaderboard preset: every method of the library at ratios 0.5, 0.75, 0.875 on the default suite.

Methods come from the registries at run time: every scorer at each ratio, every layer/head
budget paired with SnapKV at each ratio, KVzip with its own selection (one global threshold,
``kvzip+global``) at each ratio, every quantizer on its own (it has no ratio: its saving is
whatever its packed bytes are), a quantizer that demotes instead of evicting (``mixed``)
paired with KeyDiff, the best query-agnostic scorer without a second pass, at each ratio, and
every key reducer and cross-layer component (``minicache``) on its own and on top of
``kvzip+global`` at each ratio.
"""

from __future__ import annotations

from pathlib import Path

from kvsqueeze.budgets import BUDGETS
from kvsqueeze.depth import DEPTH
from kvsqueeze.eval.tasks import DEFAULT_LENGTHS, DEFAULT_SUITE
from kvsqueeze.keys import KEY_REDUCERS
from kvsqueeze.models import DEFAULT_MODEL
from kvsqueeze.quantizers import QUANTIZERS
from kvsqueeze.recipe import Recipe, RecipeError
from kvsqueeze.scorers import SCORERS

RATIOS = (0.5, 0.75, 0.875)
SAMPLES = 2  # x 3 tasks x 70 recipes; the README gives the wall time measured on 2 cores with 55
OUT_DIR = "docs/leaderboard"
"""Where the default model's leaderboard goes; another model's goes to ``OUT_DIR-<model name>``."""


def leaderboard_recipes(ratios: tuple[float, ...] = RATIOS) -> list[str]:
    """Recipe strings for every registered method (those that do not parse are skipped)."""
    candidates = ["full"]
    candidates += [f"{name}@{ratio:g}" for name in SCORERS for ratio in ratios]
    candidates += [f"snapkv+{name}@{ratio:g}" for name in BUDGETS for ratio in ratios]
    candidates += [f"kvzip+global@{ratio:g}" for ratio in ratios]
    for name, quantizer in QUANTIZERS.items():
        if quantizer.demotes:
            candidates += [f"keydiff+{name}@{ratio:g}" for ratio in ratios]
        else:
            candidates.append(name)
    for name in (*KEY_REDUCERS, *DEPTH):
        candidates += [name, *(f"kvzip+global+{name}@{ratio:g}" for ratio in ratios)]
    recipes = []
    for text in candidates:
        try:
            recipes.append(str(Recipe.parse(text)))
        except RecipeError:
            continue
    return recipes


def out_dir(model: str) -> Path:
    """The preset's output directory for ``model`` (an embedded name, HF id or local path), so
    one model's leaderboard never overwrites another's."""
    if model == DEFAULT_MODEL:
        return Path(OUT_DIR)
    return Path(f"{OUT_DIR}-{Path(model.rstrip('/')).name}")


def preset() -> dict:
    """Keyword arguments of ``EvalConfig`` for the leaderboard."""
    return {
        "recipes": leaderboard_recipes(),
        "tasks": [DEFAULT_SUITE],
        "lengths": list(DEFAULT_LENGTHS),
        "samples": SAMPLES,
        "seed": 0,
    }
