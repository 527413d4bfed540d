"""The leaderboard preset is built from the registries: every method, each recipe once, all valid."""

from __future__ import annotations

from pathlib import Path

from kvsqueeze.budgets import BUDGETS
from kvsqueeze.eval.leaderboard import OUT_DIR, RATIOS, leaderboard_recipes, out_dir
from kvsqueeze.models import DEFAULT_MODEL
from kvsqueeze.quantizers import QUANTIZERS
from kvsqueeze.recipe import Recipe
from kvsqueeze.scorers import SCORERS


def test_every_registered_method_is_on_the_leaderboard_once():
    recipes = leaderboard_recipes()
    assert recipes[0] == "full" and len(recipes) == len(set(recipes))
    assert all(str(Recipe.parse(text)) == text for text in recipes)
    for ratio in RATIOS:
        assert {f"{name}@{ratio:g}" for name in SCORERS} <= set(recipes)
        assert f"kvzip+global@{ratio:g}" in recipes and f"keydiff+mixed@{ratio:g}" in recipes
    assert {name for name in QUANTIZERS if not QUANTIZERS[name].demotes} <= set(recipes)
    paired = {text.split("@")[0].removeprefix("snapkv+") for text in recipes if text.startswith("snapkv+")}
    assert paired == set(BUDGETS)


def test_another_models_leaderboard_goes_to_its_own_directory():
    assert out_dir(DEFAULT_MODEL) == Path(OUT_DIR)
    assert out_dir("gemma3-270m") == Path(f"{OUT_DIR}-gemma3-270m")
    assert out_dir("/models/Qwen3-0.6B/") == Path(f"{OUT_DIR}-Qwen3-0.6B")
