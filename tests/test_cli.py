"""The command line: help, methods, JSON output, and clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvsqueeze.budgets import BUDGETS
from kvsqueeze.cli import main
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
    for name, scorer_cls in {**SCORERS, **BUDGETS, **UNITS, **QUANTIZERS}.items():
        assert name in out
        assert scorer_cls.citation.split(".")[0] in out  # "Authors et al., year"
    assert "window=32 (>= 1), kernel_size=7 (odd and >= 1)" in out


@pytest.mark.parametrize("command", [[], ["run"], ["methods"], ["demo"], ["eval"], ["calibrate"], ["serve"]])
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
