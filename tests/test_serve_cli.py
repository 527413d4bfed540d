"""``kvsqueeze serve`` options: sizes, defaults, the subcommand hook."""

from __future__ import annotations

import argparse

import pytest

from kvsqueeze.serve.cli import add_serve_command, parse_bytes


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
