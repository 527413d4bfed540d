"""Command line: ``kvsqueeze run | methods | demo``. Parses, calls the library, formats."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table
from transformers.utils.logging import disable_progress_bar

from kvsqueeze.demo import contains_answer, demo_case
from kvsqueeze.engine import ContextTooLongError, GenerationResult, generate
from kvsqueeze.models import DEFAULT_MODEL, ModelLoadError, load_model
from kvsqueeze.recipe import Recipe, RecipeError
from kvsqueeze.scorers import SCORERS

DEMO_RECIPES = "full,snapkv@0.75,chunkkv@0.75,expected@0.75,tova@0.75,streaming@0.75,knorm@0.75"
MODES = ("query-agnostic", "query-aware")


class UsageError(Exception):
    """Bad command-line input detected after parsing (missing file, …)."""


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"HF model id or local path (default: {DEFAULT_MODEL}, the embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        metavar="N",
        help="prefill the context N tokens at a time, compressing after each chunk "
        "(peak KV memory = budget + N)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=32, metavar="N", help="answer length limit (default 32)"
    )
    parser.add_argument(
        "--dtype", default="float32", help="model dtype (default float32: bf16 is slow on CPUs)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvsqueeze",
        description="KV-cache compression for Hugging Face transformers: answer questions about a long "
        "context with a compressed cache and see what it costs.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="answer a question about a context with a compressed cache",
        description="Prefill the context, compress its KV cache with RECIPE, answer QUESTION. "
        "Prints the answer with KV bytes held, compression ratio and timings.",
    )
    run.add_argument(
        "--recipe",
        default="full",
        help="what to keep, e.g. full, snapkv@0.75, streaming:sinks=4@0.9 "
        "(the number after @ is the fraction of context tokens removed; see `kvsqueeze methods`)",
    )
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("--context-file", type=Path, metavar="FILE", help="read the context from FILE")
    source.add_argument("--context", metavar="TEXT", help="the context text itself")
    run.add_argument("--question", required=True, help="the question asked about the context")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    run.add_argument(
        "--query-aware",
        action="store_true",
        help="compress after the question is seen "
        "(default: query-agnostic, the context is compressed before the question)",
    )
    _add_generation_options(run)

    commands.add_parser(
        "methods",
        help="list every compression method with its paper and options",
        description="List every method usable in a recipe, its paper and its options.",
    )

    demo = commands.add_parser(
        "demo",
        help="compare recipes on a ~1k-token document with a hidden fact",
        description="Answer one question about a ~1k-token document with the full cache "
        "and with several recipes, side by side.",
    )
    demo.add_argument(
        "--recipes", default=DEMO_RECIPES, help=f"comma-separated recipes (default: {DEMO_RECIPES})"
    )
    demo.add_argument(
        "--modes",
        default=",".join(MODES),
        help="query-agnostic (compress before the question), query-aware (after it), or both (default)",
    )
    _add_generation_options(demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # tables are easier to read unwrapped when written to a pipe or a file
    console = Console(width=None if sys.stdout.isatty() else 200)
    disable_progress_bar()  # transformers' per-load "Loading weights" bar is noise here
    try:
        if args.command == "methods":
            console.print(methods_table())
            return 0
        if args.command == "run":
            return _run(args, console)
        return _demo(args, console)
    except (ModelLoadError, RecipeError, ContextTooLongError, UsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, console: Console) -> int:
    recipe = Recipe.parse(args.recipe)
    context = _read_context(args)
    options = _generation_kwargs(args)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    result = generate(
        model, tokenizer, context, args.question, recipe, query_aware=args.query_aware, **options
    )
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        console.print(results_table([result]))
    return 0


def _demo(args: argparse.Namespace, console: Console) -> int:
    recipes = [Recipe.parse(text) for text in args.recipes.split(",")]
    options = _generation_kwargs(args)
    modes = [mode.strip() for mode in args.modes.split(",")]
    if unknown := set(modes) - set(MODES):
        raise UsageError(f"unknown mode(s) {', '.join(sorted(unknown))}; valid: {', '.join(MODES)}")
    case = demo_case()
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    results = []
    with console.status("") as status:
        for mode in modes:
            for recipe in recipes:
                if recipe.is_full and mode != modes[0]:
                    continue  # the full cache does not depend on when the question comes
                status.update(f"answering with {recipe} ({mode}) …")
                aware = mode == "query-aware"
                results.append(
                    generate(
                        model, tokenizer, case.context, case.question, recipe, query_aware=aware, **options
                    )
                )
    console.print(f"[bold]Question:[/] {case.question}  [bold]expected:[/] {case.answer}")
    console.print(results_table(results, expected=case.answer))
    return 0


def _generation_kwargs(args: argparse.Namespace) -> dict:
    if args.chunk_size is not None and args.chunk_size < 1:
        raise UsageError("--chunk-size must be a positive number of tokens")
    return dict(chunk_size=args.chunk_size, max_new_tokens=args.max_new_tokens)


def _read_context(args: argparse.Namespace) -> str:
    if args.context is not None:
        return args.context
    try:
        return args.context_file.read_text(encoding="utf-8")
    except OSError as error:
        raise UsageError(f"cannot read --context-file {args.context_file}: {error.strerror}") from None


def results_table(results: list[GenerationResult], expected: str | None = None) -> Table:
    table = Table(show_lines=False)
    columns = [
        "recipe",
        "mode",
        "answer",
        *(["correct"] if expected else []),
        "KV held",
        "ratio",
        "tokens kept",
        "prefill s",
        "decode s",
    ]
    for name in columns:
        table.add_column(name, justify="left" if name in ("recipe", "mode", "answer") else "right")
    for r in results:
        correct = (
            ["[green]yes[/]" if contains_answer(r.answer, expected) else "[red]no[/]"] if expected else []
        )
        table.add_row(
            r.recipe,
            r.mode,
            r.answer[:60],
            *correct,
            _mib(r.kv_bytes) + f" / {_mib(r.kv_bytes_full)}",
            f"{r.compression_ratio:.1%}",
            f"{r.tokens_kept}/{r.context_tokens + r.question_tokens}",
            f"{r.prefill_seconds:.2f}",
            f"{r.decode_seconds:.2f}",
        )
    table.caption = f"KV bytes held after prefill vs a full {results[0].kv_dtype} cache of the same tokens"
    return table


def methods_table() -> Table:
    table = Table(title="kvsqueeze methods (recipe: name[:option=value,...]@ratio, or full)")
    for name in ("name", "paper", "options"):
        table.add_column(name)
    table.add_row("full", "no compression (the baseline)", "")
    for name, scorer_cls in SCORERS.items():
        options = ", ".join(f"{k}={v}" for k, v in scorer_cls().options().items())
        table.add_row(name, scorer_cls.citation, options)
    return table


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


if __name__ == "__main__":
    sys.exit(main())
