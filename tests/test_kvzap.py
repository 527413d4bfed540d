"""kvzap: the ridge fit recovers a known map, the scorer applies the saved weights, the file
round-trips and is looked up, calibration runs end to end on a tiny model, errors say what to do."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
import torch

from kvsqueeze import generate
from kvsqueeze.calibrate import add_calibrate_command, run_calibrate
from kvsqueeze.calibrate_kvzip import (
    LOG_FLOOR,
    calibrate_kvzip,
    calibration_texts,
    record_kvzip,
)
from kvsqueeze.calibration_text import docstring_paragraphs
from kvsqueeze.eval.text import noise_sentences, prose_paragraphs
from kvsqueeze.prefill import ChunkedPrefill
from kvsqueeze.recipe import Recipe
from kvsqueeze.scorers import NEVER_EVICT, KVzap, KVzip
from kvsqueeze.scorers.base import inputs_from_tensors
from kvsqueeze.scorers.expected import rope_unrotate
from kvsqueeze.scorers.predictor import (
    PredictorNotFoundError,
    ScorePredictor,
    find_predictor,
    fit_ridge,
    token_features,
)

CONTEXT = "The museum opens at nine. " * 12 + "The pass key is 4417. " + "Tea is served at four. " * 12


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_ridge_recovers_a_known_linear_map():
    features = randn(2000, 6) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0, 5.0]) + 2.0
    weights = torch.tensor([0.5, -0.2, 4.0, 0.0, 1.5, -0.3])
    targets = features @ weights - 3.0 + 0.01 * randn(2000, seed=1)
    fitted, bias = fit_ridge(features, targets, alpha=1e-3)
    torch.testing.assert_close(fitted, weights, atol=2e-3, rtol=0)
    assert bias == pytest.approx(-3.0, abs=5e-3)


def test_features_are_key_pair_norms_and_values_whatever_the_position():
    keys, values = randn(1, 2, 5, 8), randn(1, 2, 5, 8, seed=1)
    features = token_features(keys, values)
    assert features.shape == (1, 2, 5, 12)
    torch.testing.assert_close(features[..., 0], keys[..., [0, 4]].norm(dim=-1))
    torch.testing.assert_close(features[..., 4:], values)
    inv_freq = 1.0 / 10000 ** (torch.arange(4) / 4)
    rotated = rope_unrotate(keys, -torch.arange(5.0) * 37, inv_freq)  # RoPE at positions 0, 37, ...
    torch.testing.assert_close(token_features(rotated, values), features)


def hand_predictor(layers: int = 2, heads: int = 2, dim: int = 4) -> ScorePredictor:
    width = dim // 2 + dim
    weights = [
        [[float(layer + 1) * (head + 1) * (f + 1) for f in range(width)] for head in range(heads)]
        for layer in range(layers)
    ]
    bias = [[-10.0 * (head + 1) for head in range(heads)] for _ in range(layers)]
    return ScorePredictor("org--tiny", weights, bias, {"seed": 3}, {"spearman_all": 0.5})


def test_the_scorer_applies_the_saved_weights(tmp_path):
    path = hand_predictor().save(tmp_path / "w.json")
    keys = torch.tensor([[[[3.0, 0.0, 4.0, 0.0]] * 6, [[0.0, 1.0, 0.0, 0.0]] * 6]])  # [1, 2, 6, 4]
    values = torch.ones(1, 2, 6, 4)
    inputs = inputs_from_tensors(keys, randn(1, 4, 2, 4), values=values, layer_idx=1)
    scores = KVzap(sinks=1, weights=str(path)).score(inputs)
    # layer 1, head h: weights 2 (h + 1) (f + 1); features: pair norms (5, 0) / (0, 1), values 1
    expected_head0 = 2 * (1 * 5 + 2 * 0 + 3 + 4 + 5 + 6) - 10
    expected_head1 = 4 * (1 * 0 + 2 * 1 + 3 + 4 + 5 + 6) - 20
    assert scores[0, 0, 0] == NEVER_EVICT and scores[0, 1, 0] == NEVER_EVICT
    assert scores[0, 0, 1:].tolist() == [expected_head0] * 5
    assert scores[0, 1, 1:].tolist() == [expected_head1] * 5


def test_file_round_trip_and_lookup(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSQUEEZE_HOME", str(tmp_path))
    predictor = hand_predictor()
    predictor.save(tmp_path / "kvzap" / "org--tiny.json")
    loaded = find_predictor("org/tiny")
    assert loaded == predictor and loaded.shape == (2, 2, 6)
    assert loaded.training == {"seed": 3} and loaded.quality == {"spearman_all": 0.5}


def test_the_default_model_ships_a_fitted_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSQUEEZE_HOME", str(tmp_path))
    shipped = find_predictor(str(tmp_path / "models" / "smollm2-135m"))
    assert shipped.model == "smollm2-135m" and shipped.shape == (30, 3, 96)
    assert shipped.training["text_source"].startswith("docstrings of the Python")
    assert shipped.training["tokens"] >= 5000 and "seed" in shipped.training
    assert len(shipped.quality["r2"]) == 30 and shipped.quality["spearman_all"] > 0.5


def config_of(name: str, layers: int = 2, heads: int = 2, dim: int = 4) -> SimpleNamespace:
    return SimpleNamespace(
        _name_or_path=name,
        num_hidden_layers=layers,
        num_key_value_heads=heads,
        head_dim=dim,
        num_attention_heads=2 * heads,
        hidden_size=2 * heads * dim,
    )


def test_a_model_without_a_fitted_file_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSQUEEZE_HOME", str(tmp_path))
    inputs = inputs_from_tensors(randn(1, 2, 6, 4), randn(1, 4, 2, 4), config=config_of("org/unknown"))
    with pytest.raises(
        PredictorNotFoundError, match=r"kvsqueeze calibrate --model org/unknown --target kvzip"
    ):
        KVzap().score(inputs)
    hand_predictor(layers=3).save(tmp_path / "kvzap" / "org--unknown.json")
    with pytest.raises(PredictorNotFoundError, match=r"the model needs \(2, 2, 6\)"):
        KVzap().score(inputs)
    with pytest.raises(PredictorNotFoundError, match="does not exist"):
        KVzap(weights=str(tmp_path / "none.json")).score(inputs)


def test_recipe_parse():
    recipe = Recipe.parse("kvzap+global+words+kivi4@0.75")
    assert isinstance(recipe.scorer, KVzap) and recipe.budget.name == "global"
    assert recipe.unit.name == "words" and recipe.quantizer.name == "kivi4" and recipe.ratio == 0.75
    assert isinstance(recipe.prefill_strategy(), ChunkedPrefill)  # no reconstruction pass
    assert str(Recipe.parse("kvzap:sinks=2,weights=w.json@0.5")) == "kvzap:sinks=2,weights=w.json@0.5"
    assert recipe.observed_queries() == 0 and not recipe.scorer.needs_attention


def test_calibration_texts_are_seeded_whole_paragraphs(tokenizer):
    texts = calibration_texts(tokenizer, 3, 64, seed=1)
    assert texts == calibration_texts(tokenizer, 3, 64, seed=1) != calibration_texts(tokenizer, 3, 64, seed=2)
    assert all(len(tokenizer.encode(text)) >= 64 for text in texts)


def test_calibration_text_is_no_eval_text():
    paragraphs = docstring_paragraphs()
    assert len(paragraphs) > 500 and all(len(p) >= 200 and "\n" not in p for p in paragraphs)

    def sentences(texts):  # a shared short clause ("This is particularly useful for aliases") is no leak
        return {s for text in texts for s in text.split(". ") if len(s) > 50}

    assert not sentences(prose_paragraphs()) & sentences(paragraphs)
    assert not any(noise in paragraph for noise in noise_sentences() for paragraph in paragraphs)


def test_recorded_targets_are_the_log_of_kvzip_scores(tiny):
    model, tokenizer = tiny
    text = calibration_texts(tokenizer, 1, 48, seed=0)[0]
    records = record_kvzip(model, tokenizer, text)
    assert sorted(records) == [0, 1] and len(records[0]) == 2
    features, targets = records[1][0]
    assert features.shape == (len(targets), 24) and len(targets) > 48 - KVzip().sinks
    assert (targets <= 0).all() and (targets >= torch.log(torch.tensor(LOG_FLOOR))).all()
    assert targets.std() > 0


def test_tiny_calibration_end_to_end_then_kvzap_compresses(tiny, tmp_path):
    model, tokenizer = tiny
    predictor = calibrate_kvzip(model, tokenizer, texts=3, held_out=1, text_tokens=48, seed=5)
    again = calibrate_kvzip(model, tokenizer, texts=3, held_out=1, text_tokens=48, seed=5)
    assert predictor.weights == again.weights and predictor.shape == (2, 2, 24)
    assert predictor.training["seed"] == 5 and predictor.training["tokens"] >= 2 * 48
    assert len(predictor.quality["spearman"]) == 2
    path = predictor.save(tmp_path / "tiny.json")
    full = generate(model, tokenizer, CONTEXT, "What is the pass key?", "full", max_new_tokens=2)
    recipes = ((f"kvzap:weights={path}@0.5", None), (f"kvzap:weights={path}+global+words+kivi4@0.75", 32))
    for recipe, chunk in recipes:
        result = generate(
            model, tokenizer, CONTEXT, "What is the pass key?", recipe, chunk_size=chunk, max_new_tokens=2
        )
        assert result.kv_bytes < full.kv_bytes
        assert result.tokens_kept < full.tokens_kept


def test_calibrate_command_takes_the_kvzip_target(capsys):
    parser = argparse.ArgumentParser(prog="kvsqueeze")
    add_calibrate_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["calibrate", "--target", "kvzip", "--texts", "6", "--held-out", "2"])
    assert (args.target, args.texts, args.held_out, args.text_tokens, args.ridge) == ("kvzip", 6, 2, 512, 1.0)
    assert parser.parse_args(["calibrate"]).target == "duo"
    bad = parser.parse_args(["calibrate", "--target", "kvzip", "--texts", "3", "--held-out", "3"])
    assert run_calibrate(bad) == 2
    assert "--held-out (3) must be fewer than --texts (3)" in capsys.readouterr().err
