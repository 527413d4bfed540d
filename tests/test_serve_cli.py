"""``kvsqueeze serve`` options: sizes, defaults, the subcommand hook."""

from __future__ import annotations

import argparse

import pytest

from kvsqueeze.serve.cli import add_serve_command, parse_bytes, parse_seconds
from kvsqueeze.serve.limits import ENVIRONMENT_VARIABLE, AuthError, load_api_keys, scope_of


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2GiB", 2 << 30), ("512MiB", 512 << 20), ("1e9", 10**9), ("1.5GB", 1_500_000_000), ("4096", 4096)],
)
def test_sizes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["two gigs", "5XB", ""])
def test_bad_sizes_say_what_is_accepted(text):
    with pytest.raises(argparse.ArgumentTypeError, match="examples: 2GiB"):
        parse_bytes(text)


def test_serve_subcommand_defaults_to_loopback_and_repeats_stores_and_keys():
    parser = argparse.ArgumentParser(prog="kvsqueeze")
    add_serve_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "serve",
            "--kv-memory",
            "1GiB",
            "--store",
            "/tmp/s",
            "--store",
            "redis://127.0.0.1:1/0",
            "--api-key",
            "a",
            "--api-key",
            "b",
        ]
    )
    assert args.host == "127.0.0.1" and args.kv_memory == 1 << 30
    assert args.store == ["/tmp/s", "redis://127.0.0.1:1/0"] and args.api_key == ["a", "b"]
    assert args.recipe == "full" and args.chunk_size == 256


def test_serve_refuses_a_recipe_that_does_not_parse_before_loading_the_model(capsys):
    from kvsqueeze.cli import main

    assert main(["serve", "--recipe", "snapkv:window=-3@0.5", "--model", "/no/such/model"]) == 2
    assert "snapkv:window must be >= 1, got -3" in capsys.readouterr().err


def test_api_keys_come_from_argv_a_file_and_the_environment(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nfile-key-1\n\n  file-key-2  \nargv-key\n")
    keys = load_api_keys(["argv-key"], str(key_file), {ENVIRONMENT_VARIABLE: "env-1, env-2,,"})
    assert keys == ("argv-key", "file-key-1", "file-key-2", "env-1", "env-2")
    assert scope_of(keys, "Bearer env-2") == scope_of(keys, "bearer env-2") != scope_of(keys, "Bearer env-1")
    with pytest.raises(AuthError, match="invalid API key"):
        scope_of(keys, "Bearer # team keys")
    assert scope_of((), "") == "public"
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        load_api_keys([], str(empty), {})


def test_a_missing_key_file_is_an_error_line_before_loading_the_model(capsys):
    from kvsqueeze.cli import main

    assert main(["serve", "--api-key-file", "/no/such/keys", "--model", "/no/such/model"]) == 2
    assert capsys.readouterr().err.startswith("error: cannot read --api-key-file /no/such/keys")


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--max-waiting", "-1", "must be >= 0, got -1"),
        ("--max-running", "0", "must be >= 1, got 0"),
        ("--drain-seconds", "soon", "not a duration: 'soon'"),
        ("--store-ttl", "7 weeks", "not a duration"),
    ],
)
def test_bad_option_values_exit_2_with_an_error_line(capsys, option, value, message):
    from kvsqueeze.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", option, value])
    assert exit_.value.code == 2
    assert f"error: argument {option}: {message}" in capsys.readouterr().err


def test_a_step_budget_below_one_chunk_is_an_error_line_before_loading_the_model(capsys):
    from kvsqueeze.cli import main

    argv = ["serve", "--chunk-size", "128", "--max-step-tokens", "100", "--model", "/no/such/model"]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(
        "error: --max-step-tokens 100 is less than one chunk: a step prefills at least one --chunk-size "
        "chunk (128 tokens); use at least 128"
    )


def test_durations_and_the_help_of_the_new_options(capsys):
    assert [parse_seconds(text) for text in ("30", "90s", "1.5m", "12h", "7d")] == [30, 90, 90, 43200, 604800]
    parser = argparse.ArgumentParser(prog="kvsqueeze")
    add_serve_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve"])
    assert (args.max_waiting, args.drain_seconds, args.store_ttl) == (256, 30.0, 7 * 86400)
    assert args.max_step_tokens is None
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for phrase in (
        "--api-key-file PATH",
        ENVIRONMENT_VARIABLE,
        "429 with Retry-After",
        "refuse new requests (503)",
        "--max-step-tokens N",
        "a long prompt delays the running answers by one step at a time",
    ):
        assert phrase in help_text
