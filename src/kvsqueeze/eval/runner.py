"""Run recipes x tasks x lengths x samples, one JSON line per finished sample, resumable.

Every recipe answers the same generated samples as the full-cache baseline of the same run (the
baseline is always run, first, on each sample). A line is appended and flushed as soon as a
sample is finished; a restarted run skips every (recipe, mode, task, length, sample) already in
``results.jsonl``. Greedy decoding and per-sample seeds make a rerun reproduce the same lines
(timings aside).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvsqueeze.engine import continuation_logits, generate_multiturn
from kvsqueeze.eval import tasks as task_lib
from kvsqueeze.eval.metrics import fidelity, string_match_all
from kvsqueeze.models import DEFAULT_MODEL
from kvsqueeze.recipe import Recipe

RESULTS = "results.jsonl"
CONFIG = "config.json"
FULL = "full"


class EvalError(ValueError):
    """Bad evaluation input (recipes, tasks, lengths, an output dir made by another setup)."""


@dataclass
class EvalConfig:
    """What to run. ``recipes`` are recipe strings; ``full`` is added first if missing."""

    recipes: list[str]
    tasks: list[str]
    lengths: list[int]
    samples: int = 5
    seed: int = 0
    query_aware: bool = False
    model: str = DEFAULT_MODEL
    dtype: str = "float32"
    chunk_size: int | None = None
    fidelity_tokens: int = 128
    max_new_tokens: int | None = None  # cap on every task's own answer length (None = the task's)

    def __post_init__(self) -> None:
        parsed = []
        for text in self.recipes:
            recipe = str(Recipe.parse(text))  # raises RecipeError with the valid names
            if recipe not in parsed:
                parsed.append(recipe)
        self.recipes = [FULL] + [r for r in parsed if r != FULL]
        self.tasks = task_lib.resolve_tasks(self.tasks)
        if self.samples < 1:
            raise EvalError("--samples must be at least 1")
        if not self.lengths:
            raise EvalError("give at least one length")

    @property
    def mode(self) -> str:
        return "query-aware" if self.query_aware else "query-agnostic"

    def identity(self) -> dict:
        """Settings that must match for results to be comparable (checked on resume)."""
        return {
            "model": self.model,
            "dtype": self.dtype,
            "seed": self.seed,
            "chunk_size": self.chunk_size,
            "fidelity_tokens": self.fidelity_tokens,
            "max_new_tokens": self.max_new_tokens,
        }


def record_key(recipe: str, mode: str, task: str, length: int, sample: int) -> str:
    return f"{recipe}|{mode}|{task}|{length}|{sample}"


def load_records(out_dir: Path) -> list[dict]:
    """Every complete JSON line of ``results.jsonl`` (a torn last line from a crash is ignored).

    Lines written before they recorded ``chunk_size`` get the one in ``config.json``: a resumed
    run must match it, so every line of a directory was prefilled with it."""
    path = Path(out_dir) / RESULTS
    if not path.exists():
        return []
    config_path = Path(out_dir) / CONFIG
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    defaults = {"chunk_size": config["chunk_size"]} if "chunk_size" in config else {}
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append({**defaults, **json.loads(line)})
        except json.JSONDecodeError:
            continue
    return records


def _prepare_dir(config: EvalConfig, out_dir: Path) -> set[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / CONFIG
    if config_path.exists():
        saved = json.loads(config_path.read_text(encoding="utf-8"))
        differs = {k: (saved.get(k), v) for k, v in config.identity().items() if saved.get(k) != v}
        if differs:
            detail = ", ".join(f"{k}={old!r} there, {new!r} now" for k, (old, new) in differs.items())
            raise EvalError(f"{out_dir} holds results of another setup ({detail}); use another --out")
    config_path.write_text(json.dumps(asdict(config), indent=1) + "\n")
    path = out_dir / RESULTS
    if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        with path.open("a", encoding="utf-8") as handle:  # end a torn line so new lines stay whole
            handle.write("\n")
    return {r["key"] for r in load_records(out_dir) if "key" in r}


def _plan(config: EvalConfig, done: set[str]) -> Iterator[tuple[str, int, int, list[str]]]:
    """(task, length, sample, recipes still to run), sample index outermost: an interrupted run
    has every recipe on the same samples of every task and length."""
    for index in range(config.samples):
        for task in config.tasks:
            for length in config.lengths:
                todo = [
                    r for r in config.recipes if record_key(r, config.mode, task, length, index) not in done
                ]
                if todo:
                    yield task, length, index, todo


def run_eval(
    config: EvalConfig,
    out_dir: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    console: Console | None = None,
) -> dict:
    """Run what is not in ``out_dir`` yet. Returns counts; ``KeyboardInterrupt`` keeps finished lines."""
    console = console or Console(stderr=True)
    out_dir = Path(out_dir)
    done = _prepare_dir(config, out_dir)
    plan = list(_plan(config, done))
    total = sum(len(todo) for *_, todo in plan)
    skipped = len(config.recipes) * len(config.tasks) * len(config.lengths) * config.samples - total
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    finished = 0
    with (
        (out_dir / RESULTS).open("a", encoding="utf-8") as handle,
        Progress(*columns, console=console, transient=False) as progress,
    ):
        bar = progress.add_task("eval", total=total)
        for task, length, index, todo in plan:
            runner = _FidelityRun if task == task_lib.FIDELITY else _TaskRun
            run = runner(config, model, tokenizer, task, length, index)
            for recipe in todo:
                progress.update(bar, description=f"{task} {length} #{index} {recipe}")
                record = run.run(recipe)
                record["key"] = record_key(recipe, config.mode, task, length, index)
                handle.write(json.dumps(record) + "\n")
                handle.flush()
                finished += 1
                progress.advance(bar)
    return {"ran": finished, "skipped": skipped}


class _TaskRun:
    """One generated sample, answered by each recipe in turn."""

    def __init__(self, config, model, tokenizer, task, length, index):
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.sample = task_lib.make_sample(tokenizer, task, length, index, config.seed)

    def run(self, recipe: str) -> dict:
        sample, config = self.sample, self.config
        start = time.perf_counter()
        results = generate_multiturn(
            self.model,
            self.tokenizer,
            sample.context,
            list(sample.questions),
            recipe,
            query_aware=config.query_aware,
            chunk_size=config.chunk_size,
            max_new_tokens=min(sample.max_new_tokens, config.max_new_tokens or sample.max_new_tokens),
            answer_prefix=sample.answer_prefix
            if isinstance(sample.answer_prefix, str)
            else list(sample.answer_prefix),
        )
        wall = time.perf_counter() - start
        scores = [
            string_match_all(r.answer, answers) for r, answers in zip(results, sample.answers, strict=True)
        ]
        first = results[0]
        record = {
            **_common(config, recipe, sample.task, sample.length, sample.index),
            "prompt_tokens": sample.prompt_tokens,
            "context_tokens": first.context_tokens,
            "depth": sample.depth,
            "info": sample.info,
            "score": sum(scores) / len(scores),
            **_bytes_fields(asdict(first)),
            "kv_bytes_peak": max(r.kv_bytes_peak for r in results),
            "kv_bytes_end": max(r.kv_bytes_end for r in results),
            "prefill_seconds": sum(r.prefill_seconds for r in results),
            "decode_seconds": sum(r.decode_seconds for r in results),
            "wall_seconds": wall,
        }
        if len(results) == 1:
            record.update(prediction=first.answer, answers=list(sample.answers[0]))
        else:
            record.update(
                prediction=[r.answer for r in results],
                answers=[list(a) for a in sample.answers],
                turn_scores=scores,
                questions=list(sample.questions),
            )
        return record


def _bytes_fields(footprint: dict) -> dict:
    names = ("kv_bytes", "kv_bytes_full", "kv_bytes_16bit", "kv_bytes_full_16bit", "kv_dtype")
    fields = {name: footprint[name] for name in names}
    return {**fields, "compression_ratio": 1.0 - fields["kv_bytes"] / fields["kv_bytes_full"]}


class _FidelityRun:
    """One prose window; the full cache's logits are computed once and kept for the comparisons."""

    def __init__(self, config, model, tokenizer, task, length, index):
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.length, self.index = length, index
        self.context, self.continuation = task_lib.fidelity_tokens(
            tokenizer, length, index, config.seed, config.fidelity_tokens
        )
        self.full = None

    def run(self, recipe: str) -> dict:
        if self.full is None:
            self.full = self._logits(FULL)
        result = self.full if recipe == FULL else self._logits(recipe)
        metrics = fidelity(self.full.logits, result.logits, self.continuation)
        return {
            **_common(self.config, recipe, task_lib.FIDELITY, self.length, self.index),
            "prompt_tokens": len(self.context),
            "context_tokens": len(self.context),
            "continuation_tokens": len(self.continuation),
            "score": metrics["top1"],
            **metrics,
            **_bytes_fields(result.footprint),
            "prefill_seconds": result.seconds,
            "decode_seconds": 0.0,
            "wall_seconds": result.seconds,
        }

    def _logits(self, recipe: str):
        return continuation_logits(
            self.model, self.context, self.continuation, recipe, self.config.chunk_size, self.tokenizer
        )


def _common(config: EvalConfig, recipe: str, task: str, length: int, index: int) -> dict:
    return {
        "recipe": recipe,
        "mode": config.mode,
        "task": task,
        "length": length,
        "sample": index,
        "seed": config.seed,
        "model": config.model,
        "chunk_size": config.chunk_size,
        "python": platform.python_version(),
    }
