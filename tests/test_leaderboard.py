"""The leaderboard preset is built from the registries: every method, each recipe once, all valid."""

from __future__ import annotations

from kvsqueeze.budgets import BUDGETS
from kvsqueeze.eval.leaderboard import RATIOS, leaderboard_recipes
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
