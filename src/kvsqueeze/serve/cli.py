"""``kvsqueeze serve``: options, size parsing, and starting uvicorn on the app."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from kvsqueeze.argtypes import count
from kvsqueeze.models import DEFAULT_MODEL
from kvsqueeze.prefill import DEFAULT_CHUNK_SIZE
from kvsqueeze.serve.limits import ENVIRONMENT_VARIABLE, load_api_keys
from kvsqueeze.serve.prompts import DEFAULT_PROTECT_TAIL

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "t": 10**12,
    "tb": 10**12,
}


def parse_bytes(text: str) -> int:
    """``"2GiB"`` -> 2147483648; accepts B, kB/MB/GB (powers of 10) and KiB/MiB/GiB (powers of 2)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 2GiB, 512MiB, 1e9)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_seconds(text: str) -> float:
    """``"7d"`` -> 604800.0; a number of seconds with an optional unit s, m, h or d."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smhd]?)\s*", str(text).lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (examples: 30, 90s, 12h, 7d)")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def add_serve_command(subparsers) -> argparse.ArgumentParser:
    """Add ``serve`` to a ``kvsqueeze`` subparsers object; returns the parser."""
    parser = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible server with compressed KV caches and a context store",
        description="Serve MODEL over an OpenAI-compatible HTTP API with continuous batching under a KV "
        "memory budget, prefix reuse and a compressed context store (RAM -> disk -> Redis).",
    )
    add_serve_arguments(parser)
    return parser


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"HF model id or local path (default {DEFAULT_MODEL})"
    )
    parser.add_argument(
        "--recipe", default="full", help="compression recipe of every cache, e.g. snapkv@0.75"
    )
    parser.add_argument(
        "--kv-memory",
        type=parse_bytes,
        default=parse_bytes("2GiB"),
        metavar="SIZE",
        help="KV cache budget: bytes the running caches really hold (default 2GiB)",
    )
    parser.add_argument(
        "--store",
        action="append",
        default=[],
        metavar="DIR|redis://HOST:PORT",
        help="context store tier after the in-RAM LRU: a directory (safetensors files) or a Redis URL; "
        "repeat for both, in lookup order",
    )
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on every route but /health; repeat for several keys "
        "(each key only sees the contexts it created). Visible in ps: prefer --api-key-file or "
        f"{ENVIRONMENT_VARIABLE}",
    )
    parser.add_argument(
        "--api-key-file",
        metavar="PATH",
        help="a file of accepted API keys, one per line (blank lines and # comments skipped); keys "
        f"from --api-key and from the environment variable {ENVIRONMENT_VARIABLE} (comma-separated) "
        "are accepted too",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--chunk-size",
        type=count(1),
        default=DEFAULT_CHUNK_SIZE,
        metavar="N",
        help=f"context prefill chunk and prefix-reuse block, in tokens (default {DEFAULT_CHUNK_SIZE})",
    )
    parser.add_argument(
        "--protect-tail",
        type=count(0),
        default=DEFAULT_PROTECT_TAIL,
        metavar="N",
        help="most prompt tokens never compressed at the end of the last user message: its last "
        "paragraph (from its last blank line: the question after a document) if it has at most N "
        "tokens, else its last N tokens; the chat template's turn end and assistant header after "
        "them are never compressed either. Everything before, a document pasted into the message "
        f"included, is compressed and reused as a prefix (default {DEFAULT_PROTECT_TAIL}; "
        "/v1/completions prompts are cut the same way)",
    )
    parser.add_argument(
        "--store-ram",
        type=parse_bytes,
        default=parse_bytes("1GiB"),
        metavar="SIZE",
        help="in-RAM LRU tier of the context store (default 1GiB)",
    )
    parser.add_argument(
        "--prefix-cache",
        type=parse_bytes,
        default=parse_bytes("512MiB"),
        metavar="SIZE",
        help="RAM for saved prefix states; 0 disables prefix reuse (default 512MiB)",
    )
    parser.add_argument(
        "--max-tokens-limit",
        type=int,
        default=2048,
        metavar="N",
        help="largest max_tokens a request may ask for (default 2048)",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=parse_bytes,
        default=parse_bytes("4MiB"),
        metavar="SIZE",
        help="largest request body (default 4MiB)",
    )
    parser.add_argument(
        "--max-running", type=count(1), default=64, metavar="N", help="largest running batch (default 64)"
    )
    parser.add_argument(
        "--max-step-tokens",
        type=count(1),
        default=None,
        metavar="N",
        help="tokens one step of the running batch holds: a decode token per running sequence, the rest "
        "prefills a joining prompt in whole --chunk-size chunks (at least one), continued at the next "
        "step, so a long prompt delays the running answers by one step at a time, not its whole "
        "prefill; at least --chunk-size (default: two chunks, 512 at the default --chunk-size)",
    )
    parser.add_argument(
        "--max-waiting",
        type=count(0),
        default=256,
        metavar="N",
        help="requests that may wait for the running batch; more get 429 with Retry-After "
        "(default 256, 0 = unbounded)",
    )
    parser.add_argument(
        "--drain-seconds",
        type=parse_seconds,
        default=30.0,
        metavar="DURATION",
        help="on SIGTERM/SIGINT: refuse new requests (503) and let those in flight finish for at most "
        "this long, then end them with an error and exit; a second signal exits at once (default 30)",
    )
    parser.add_argument(
        "--store-ttl",
        type=parse_seconds,
        default=parse_seconds("7d"),
        metavar="DURATION",
        help="expiry of context entries in Redis tiers, e.g. 3600, 12h, 7d; 0 = never (default 7d)",
    )
    parser.add_argument("--served-model-name", default=None, help="model name in the API (default: --model)")
    parser.add_argument("--dtype", default="float32", help="model dtype (default float32)")
    parser.add_argument(
        "--threads",
        type=count(1),
        default=None,
        metavar="N",
        help="torch intra-op threads (default: torch's choice); 1 avoids OpenMP stalls on a busy CPU",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def run_serve(args: argparse.Namespace) -> int:
    """Load the model and serve until interrupted; returns an exit status."""
    import uvicorn

    from kvsqueeze.models import ModelLoadError, load_model
    from kvsqueeze.recipe import Recipe, RecipeError
    from kvsqueeze.serve.app import ServeConfig, Server, create_app
    from kvsqueeze.serve.drain import DrainingServer

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        api_keys = load_api_keys(args.api_key, args.api_key_file, os.environ)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.max_step_tokens is not None and args.max_step_tokens < args.chunk_size:
        print(
            f"error: --max-step-tokens {args.max_step_tokens} is less than one chunk: a step prefills at "
            f"least one --chunk-size chunk ({args.chunk_size} tokens); use at least {args.chunk_size}",
            file=sys.stderr,
        )
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        recipe = Recipe.parse(args.recipe)
        model, tokenizer = load_model(args.model, dtype=args.dtype)
        if reason := recipe.misses_every_layer(model.config):
            raise RecipeError(reason)
    except (RecipeError, ModelLoadError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_keys:
        logging.getLogger("kvsqueeze.serve").warning(
            "binding %s without --api-key: anyone who can reach it can use it", args.host
        )
    config = ServeConfig(
        model_name=args.served_model_name or args.model,
        recipe=args.recipe,
        kv_memory=args.kv_memory,
        chunk_size=args.chunk_size,
        protect_tail=args.protect_tail,
        api_keys=api_keys,
        stores=tuple(args.store),
        store_ram=args.store_ram,
        prefix_cache=args.prefix_cache,
        max_tokens_limit=args.max_tokens_limit,
        max_request_bytes=args.max_request_bytes,
        max_running=args.max_running,
        max_step_tokens=args.max_step_tokens,
        max_waiting=args.max_waiting,
        store_ttl=args.store_ttl,
    )
    server = Server(config, model, tokenizer)
    web = uvicorn.Config(create_app(server), host=args.host, port=args.port, log_level=args.log_level)
    DrainingServer(web, server, args.drain_seconds).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvsqueeze.serve", description=add_serve_command.__doc__)
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))
