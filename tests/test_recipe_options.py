"""Every option of every recipe component declares its valid range, and a value outside it is a
clear error (``RecipeError`` from a recipe string, ``ValueError`` from Python) naming the option,
the value and the range; the values at the edges of each range parse and run."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from test_cache import run
from tiny_models import padded_batch, random_kvzap_weights, tiny_model

from kvsqueeze.attention import install
from kvsqueeze.budgets.head_profile import HeadProfile
from kvsqueeze.cache import CompressedCache
from kvsqueeze.components import OptionRange
from kvsqueeze.recipe import Recipe, RecipeError, components
from kvsqueeze.scorers import SnapKV
from kvsqueeze.scorers.base import ScoringInputs, inputs_from_tensors

COMPONENTS = components()
OPTIONS = [
    pytest.param(name, field.name, id=f"{name}:{field.name}")
    for name, cls in COMPONENTS.items()
    for field in dataclasses.fields(cls)
]
WITH_OPTIONS = [name for name, cls in COMPONENTS.items() if dataclasses.fields(cls)]
SCORERS_WITH_OPTIONS = [name for name in WITH_OPTIONS if COMPONENTS[name].kind == "scorer"]
BUDGETS_AND_QUANTIZERS = [name for name in WITH_OPTIONS if COMPONENTS[name].kind in ("budget", "quantizer")]
UNBOUNDED = 10**4
"""Stands for the largest value of an option with no maximum (far beyond the test sequences)."""


def kind_of(name: str, key: str) -> type:
    return type(getattr(COMPONENTS[name](), key))


def in_recipe(name: str, options: str) -> str:
    """A recipe with component ``name`` set to ``options``, valid in every other way."""
    spec = f"{name}:{options}"
    kind = COMPONENTS[name].kind
    if kind == "quantizer":
        return spec
    return f"{spec}@0.5" if kind == "scorer" else f"snapkv+{spec}@0.5"


def outside(allowed: OptionRange, kind: type) -> list:
    """Values just outside ``allowed`` for an option of type ``kind`` (str options take any text)."""
    if kind is bool:
        return ["maybe"]
    if kind is str:
        return []
    values = []
    if allowed.minimum is not None:
        values.append(beyond(kind(allowed.minimum), up=False))
    if allowed.maximum is not None:
        values.append(beyond(kind(allowed.maximum), up=True))
    if allowed.choices:
        low, high = min(allowed.choices), max(allowed.choices)
        values += [v for v in range(low - 1, high + 2) if v not in allowed.choices]
    if allowed.odd:
        values.append(edge(allowed, kind, largest=False) + 1)
    return values + ([2**31] if kind is int else [math.nan, math.inf])


def beyond(bound: float, up: bool) -> float:
    """The nearest value of ``bound``'s type above (or below) it."""
    if isinstance(bound, int):
        return bound + (1 if up else -1)
    return math.nextafter(bound, math.inf if up else -math.inf)


def edge(allowed: OptionRange, kind: type, largest: bool):
    """The smallest or largest value ``allowed`` accepts (``UNBOUNDED`` for no maximum)."""
    if kind is bool:
        return largest
    if allowed.choices:
        return max(allowed.choices) if largest else min(allowed.choices)
    bound = allowed.maximum if largest else allowed.minimum
    value = kind(UNBOUNDED if bound is None else bound)
    if allowed.odd and value % 2 == 0:
        value += -1 if largest else 1
    return value


def edges(name: str, largest: bool) -> dict:
    """Every non-text option of component ``name`` at its smallest or largest valid value."""
    return {
        key: edge(allowed, kind_of(name, key), largest)
        for key, allowed in COMPONENTS[name].ranges().items()
        if kind_of(name, key) is not str
    }


def scoring_inputs() -> ScoringInputs:
    """One layer's inputs: 2 KV heads of 16 candidates, 4 query heads, the last 4 queries, budget 8."""
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 1, 2, 16, 8, generator=generator)
    queries = torch.randn(1, 4, 4, 8, generator=generator)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2) / 8)
    return inputs_from_tensors(keys, queries, values, rope_inv_freq=inv_freq, budget=torch.full((1, 2), 8))


OUT_OF_RANGE = [
    pytest.param(name, key, value, id=f"{name}:{key}={value}")
    for name, cls in COMPONENTS.items()
    for key, allowed in cls.ranges().items()
    for value in outside(allowed, kind_of(name, key))
]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return install(tiny_model("llama"))


@pytest.mark.parametrize(("name", "key"), OPTIONS)
def test_every_option_declares_its_range(name, key):
    allowed = COMPONENTS[name].ranges().get(key)
    assert allowed is not None, f"declare {name}:{key} with kvsqueeze.components.option(default, ...)"
    if kind_of(name, key) in (int, float):
        assert allowed.choices or allowed.minimum is not None, f"{name}:{key} needs a lower bound"


@pytest.mark.parametrize(("name", "key", "value"), OUT_OF_RANGE)
def test_out_of_range_value_is_a_recipe_error_naming_option_value_and_range(name, key, value):
    with pytest.raises(RecipeError) as error:
        Recipe.parse(in_recipe(name, f"{key}={value}"))
    message = str(error.value)
    assert f"{name}:{key}" in message and f"got {value!r}" in message
    if not isinstance(value, str):
        assert str(COMPONENTS[name].ranges()[key]) in message
        with pytest.raises(ValueError) as direct:
            COMPONENTS[name](**{key: value})
        assert str(direct.value) == message


def test_the_issue_example():
    with pytest.raises(RecipeError, match=r"^snapkv:window must be >= 1, got -3$"):
        Recipe.parse("snapkv:window=-3@0.5")
    with pytest.raises(ValueError, match=r"^snapkv:kernel_size must be odd and >= 1, got 4$"):
        SnapKV(kernel_size=4)


@pytest.mark.parametrize("largest", [False, True], ids=["smallest", "largest"])
@pytest.mark.parametrize("name", WITH_OPTIONS)
def test_the_edges_of_every_range_parse(name, largest):
    values = edges(name, largest)
    text = in_recipe(name, ",".join(f"{key}={value}" for key, value in values.items()))
    component = getattr(Recipe.parse(text), COMPONENTS[name].kind)
    assert component.options() == {**COMPONENTS[name]().options(), **values}


@pytest.mark.parametrize("largest", [False, True], ids=["smallest", "largest"])
@pytest.mark.parametrize("name", SCORERS_WITH_OPTIONS)
def test_scorers_score_at_the_edges_of_their_ranges(name, largest, tmp_path):
    options = edges(name, largest) | ({"weights": random_kvzap_weights(tmp_path)} if name == "kvzap" else {})
    ranking, _ = COMPONENTS[name](**options).rank(scoring_inputs())
    assert ranking.shape == (1, 2, 16) and not bool(ranking.isnan().any())


@pytest.mark.parametrize("largest", [False, True], ids=["smallest", "largest"])
@pytest.mark.parametrize("name", BUDGETS_AND_QUANTIZERS)
def test_budgets_and_quantizers_run_at_the_edges_of_their_ranges(name, largest, model, tmp_path):
    options = ",".join(f"{key}={value}" for key, value in edges(name, largest).items())
    if name == "duo":
        profile = HeadProfile(model="tiny", scores=[[0.9, 0.1], [0.2, 0.8]]).save(tmp_path / "tiny.json")
        options += f",profile={profile}"
    scorer = "knorm" if COMPONENTS[name].kind == "quantizer" else "snapkv"
    cache = CompressedCache(Recipe.parse(f"{scorer}+{name}:{options}@0.5"))
    ids, mask = padded_batch([40, 30])
    with torch.no_grad():
        logits = run(model, cache, ids, mask)
    assert bool(torch.isfinite(logits).all())
