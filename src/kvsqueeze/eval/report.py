"""The summary of an eval directory: markdown tables rendered from ``results.jsonl`` alone.

Scores are RULER string-match percentages. Every comparison with the full cache uses only the
samples the full cache also answered in that directory (same task, length, sample index, mode).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean

from kvsqueeze.eval.intervals import RESAMPLES, SEED, Interval, bootstrap_mean, mean_interval, paired_ratio
from kvsqueeze.eval.runner import FULL, load_records
from kvsqueeze.eval.tasks import FIDELITY, LONG_GENERATION, TASKS

SUMMARY = "summary.md"
_UNRECORDED = "not recorded"


def _sample_id(record: dict) -> tuple:
    return record["mode"], record["task"], record["length"], record["sample"]


def _order(values) -> list:
    seen: list = []
    for value in values:
        if value not in seen:
            seen.append(value)
    return seen


def recipe_order(records: list[dict]) -> list[str]:
    """``full`` first, then methods in the order they were run, each by ratio."""
    recipes = _order(r["recipe"] for r in records)
    methods = _order(recipe.rpartition("@")[0] or recipe for recipe in recipes)

    def key(recipe: str) -> tuple:
        body, _, ratio = recipe.rpartition("@")
        return (recipe != FULL, methods.index(body or recipe), float(ratio) if body else 0.0)

    return sorted(recipes, key=key)


def matched(records: list[dict]) -> list[dict]:
    """Records whose sample the full cache also answered (in the same mode)."""
    baseline = {_sample_id(r) for r in records if r["recipe"] == FULL}
    return [r for r in records if _sample_id(r) in baseline]


def _label_lengths(lengths: list[int]) -> str:
    return ", ".join(f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in sorted(lengths))


def reduction_16bit(records: list[dict]) -> float | None:
    """Bytes of a 16-bit full cache / bytes held with the model's KV at 16 bits, over ``records``
    (None for records written before these fields existed)."""
    if not records or any("kv_bytes_16bit" not in r for r in records):
        return None
    return sum(r["kv_bytes_full_16bit"] for r in records) / sum(r["kv_bytes_16bit"] for r in records)


def summarize(records: list[dict]) -> dict:
    """Per (mode, recipe): mean score per task, mean over tasks, relative to full (each with its
    95% interval, see ``kvsqueeze.eval.intervals``), ratio, samples."""
    records = [r for r in matched(records) if r["task"] in TASKS]
    table: dict = {}
    for mode in _order(r["mode"] for r in records):
        rows = [r for r in records if r["mode"] == mode]
        tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
        full_score = {_sample_id(r): r["score"] for r in rows if r["recipe"] == FULL}
        out = {}
        for recipe in recipe_order(rows):
            mine = [r for r in rows if r["recipe"] == recipe]
            by_task = {t: [r for r in mine if r["task"] == t] for t in tasks}
            by_task = {t: task_rows for t, task_rows in by_task.items() if task_rows}
            scores = {t: [r["score"] for r in task_rows] for t, task_rows in by_task.items()}
            # relative to full on exactly this recipe's samples (a partial run compares like with like)
            baseline = [[full_score[_sample_id(r)] for r in task_rows] for task_rows in by_task.values()]
            row_mean = mean(mean(s) for s in scores.values())
            base = mean(mean(b) for b in baseline)
            out[recipe] = {
                "tasks": {t: mean(s) for t, s in scores.items()},
                "task_intervals": {t: mean_interval([s]) for t, s in scores.items()},
                "task_samples": {t: len(s) for t, s in scores.items()},
                "mean": row_mean,
                "interval": mean_interval(list(scores.values())),
                "relative": row_mean / base if base > 0 else None,
                "relative_interval": paired_ratio(list(scores.values()), baseline) if base > 0 else None,
                "ratio": mean(r["compression_ratio"] for r in mine),
                "reduction_16bit": reduction_16bit(mine),
                "kv_dtype": mine[0]["kv_dtype"],
                "samples": len(mine),
                "complete": len(scores) == len(tasks),
            }
        full_row = out.get(FULL, {})
        table[mode] = {
            "tasks": tasks,
            "rows": out,
            "full_mean": full_row.get("mean"),
            "full_interval": full_row.get("interval"),
        }
    return table


def _with_interval(value: float, interval: Interval, scale: float = 100.0, digits: int = 1) -> str:
    return (
        f"{scale * value:.{digits}f} [{scale * interval.low:.{digits}f}, {scale * interval.high:.{digits}f}]"
    )


def _score_cell(scores: list[float]) -> str:
    """``73.3 [58.1, 86.7] (n=30)``: a mean score (%), its 95% interval, the prompts it rests on."""
    return f"{_with_interval(mean(scores), mean_interval([scores]))} (n={len(scores)})"


def _relative_cell(row: dict) -> str:
    if row["relative"] is None:
        return "–"
    return _with_interval(row["relative"], row["relative_interval"], scale=1.0, digits=2)


def prefill_label(records: list[dict]) -> str:
    """How the contexts of ``records`` were prefilled (lines from before the field: "not recorded")."""

    def label(size) -> str:
        if size == _UNRECORDED:
            return "not recorded"
        return "the whole context in one forward" if size is None else f"chunks of {size} tokens"

    return "; ".join(label(size) for size in _order(r.get("chunk_size", _UNRECORDED) for r in records))


def summary_markdown(
    records: list[dict], title: str = "kvsqueeze eval", target_vs_full: float | None = None
) -> str:
    """Markdown tables: scores with 95% intervals, per task, by length, multi-turn turns, fidelity,
    and, given ``target_vs_full``, which recipes meet it; plot links."""
    if not records:
        return f"# {title}\n\nNo results yet.\n"
    first = records[0]
    lengths = _order(r["length"] for r in records)
    samples = len({(r["task"], r["length"], r["sample"]) for r in records})
    lines = [
        f"# {title}",
        "",
        f"Model `{first['model']}`, lengths {_label_lengths(lengths)} tokens, seed {first['seed']}, "
        f"{samples} (task, length, sample) prompts; prefill: {prefill_label(records)}. "
        "Scores: RULER string match, % of expected answers "
        "found (whole words, case-insensitive). **ratio** = 1 − KV bytes held / bytes of a full "
        f"{first['kv_dtype']} cache of the same tokens, measured after prefill. **x 16-bit** = bytes of "
        "a 16-bit full cache / bytes this cache holds with the model's KV in 16 bits (codes, scales and "
        "indices unchanged), the papers' reference. **vs full** = mean score / full-cache mean on the "
        "same samples.",
        "",
        f"**[low, high]** = 95% interval; **n** = the prompts a value rests on. A pass rate (one task, "
        f"every score 0 or 1) gets a Wilson interval; other means a percentile bootstrap over prompts "
        f"({RESAMPLES:,} resamples, seed {SEED}, resampled within each task); **vs full** a paired "
        "bootstrap: each resample draws prompts and reads the recipe and the full cache on the same ones. "
        "A bootstrap sees only the variation the prompts showed: when every prompt of a task scored "
        "alike (likely at small n) its interval is too narrow, zero-width at the extreme.",
        "",
    ]
    lines += _layers_compressed(records)
    for mode, block in summarize(records).items():
        tasks = block["tasks"]
        lines += [f"## Scores ({mode})", ""]
        if mode == "query-agnostic":
            lines += ["The context is compressed before the question is seen.", ""]
        else:
            lines += ["The context is compressed with the (first) question visible and protected.", ""]
        header = ["recipe", "mean", "vs full", "ratio", "x 16-bit", "KV dtype", "n"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for recipe, row in block["rows"].items():
            mean_cell = _with_interval(row["mean"], row["interval"]) + ("" if row["complete"] else "*")
            cells = [
                f"`{recipe}`",
                mean_cell,
                _relative_cell(row),
                f"{100 * row['ratio']:.1f}%",
                "–" if row["reduction_16bit"] is None else f"{row['reduction_16bit']:.1f}x",
                row["kv_dtype"],
                str(row["samples"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        if any(not row["complete"] for row in block["rows"].values()):
            lines += ["", "\\* not every task finished for this recipe: mean over the finished ones."]
        lines += ["", f"### Per task ({mode})", "", "| recipe | " + " | ".join(tasks) + " |"]
        lines.append("|" + "---|" * (len(tasks) + 1))
        for recipe, row in block["rows"].items():
            cells = [
                f"{_with_interval(row['tasks'][t], row['task_intervals'][t])} (n={row['task_samples'][t]})"
                if t in row["tasks"]
                else "–"
                for t in tasks
            ]
            lines.append(f"| `{recipe}` | " + " | ".join(cells) + " |")
        lines.append("")
        if target_vs_full is not None:
            lines += _target(block, mode, target_vs_full)
        lines += _by_length(records, mode)
        lines += _multiturn(records, mode)
    lines += _fidelity(records)
    lines += _long_generation(records)
    return "\n".join(lines).rstrip() + "\n"


def _layers_compressed(records: list[dict]) -> list[str]:
    """A line naming, per recipe, how many layers it compressed, when some recipe left layers as
    transformers' cache holds them (sliding-window layers); nothing otherwise (or for old results)."""
    counts = {}
    for record in records:
        if record["recipe"] != FULL and "compressed_layers" in record:
            counts.setdefault(record["recipe"], (record["compressed_layers"], record["layers"]))
    if all(compressed == layers for compressed, layers in counts.values()):
        return []
    cells = ", ".join(f"`{recipe}` {compressed}/{layers}" for recipe, (compressed, layers) in counts.items())
    return [
        f"Layers compressed: {cells}. The others hold what transformers' own cache holds (a "
        "sliding-window layer its window; a recipe with `sliding` compresses those too).",
        "",
    ]


def _target(block: dict, mode: str, target: float) -> list[str]:
    lines = [
        f"### Target: vs full ≥ {target:g} ({mode})",
        "",
        f"A recipe meets it when the lower end of its 95% vs-full interval is at least {target:g}.",
        "",
        "| recipe | vs full | n | meets |",
        "|---|---|---|---|",
    ]
    for recipe, row in block["rows"].items():
        if recipe == FULL:
            continue
        meets = row["relative_interval"] is not None and row["relative_interval"].clears(target)
        lines.append(
            f"| `{recipe}` | {_relative_cell(row)} | {row['samples']} | {'yes' if meets else 'no'} |"
        )
    return [*lines, ""]


def _by_length(records: list[dict], mode: str) -> list[str]:
    rows = [r for r in matched(records) if r["mode"] == mode and r["task"] in TASKS]
    lengths = sorted(_order(r["length"] for r in rows))
    if len(lengths) < 2:
        return []
    per = defaultdict(list)
    for r in rows:
        per[(r["recipe"], r["length"])].append(r["score"])
    lines = [f"### Mean score by length ({mode})", "", "| recipe | " + " | ".join(map(str, lengths)) + " |"]
    lines.append("|" + "---|" * (len(lengths) + 1))
    for recipe in recipe_order(rows):
        cells = [_score_cell(per[(recipe, n)]) if per[(recipe, n)] else "–" for n in lengths]
        lines.append(f"| `{recipe}` | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _multiturn(records: list[dict], mode: str) -> list[str]:
    rows = [r for r in matched(records) if r["mode"] == mode and "turn_scores" in r]
    if not rows:
        return []
    lines = [
        f"### Shared context, several questions ({mode})",
        "",
        "One context compressed once; turn 1 is the first question, later turns ask other keys "
        "against the same compressed cache.",
        "",
        "| recipe | turn 1 | later turns | n |",
        "|---|---|---|---|",
    ]
    for recipe in recipe_order(rows):
        mine = [r for r in rows if r["recipe"] == recipe]
        first = [r["turn_scores"][0] for r in mine]
        # one value per prompt: its later turns share one compressed context
        later = [mean(r["turn_scores"][1:]) for r in mine]
        first_cell, later_cell = (_with_interval(mean(s), mean_interval([s])) for s in (first, later))
        lines.append(f"| `{recipe}` | {first_cell} | {later_cell} | {len(mine)} |")
    return [*lines, ""]


def _fidelity(records: list[dict]) -> list[str]:
    rows = [r for r in matched(records) if r["task"] == FIDELITY]
    if not rows:
        return []
    tokens = rows[0]["continuation_tokens"]
    lines = [
        "## Fidelity (no answer key)",
        "",
        f"English prose: a context prefix is compressed, then {tokens} held tokens are teacher-forced. "
        "KL(full ‖ compressed) per token in nats, top-1 agreement with the full cache, perplexity "
        "of the held tokens (full-cache perplexity in the first row); bootstrap intervals over windows.",
        "",
        "| recipe | KL | top-1 agree (%) | perplexity | ratio | n |",
        "|---|---|---|---|---|---|",
    ]
    for recipe in recipe_order(rows):
        mine = [r for r in rows if r["recipe"] == recipe]
        kl, top1, ppl = (
            _mean_with_bootstrap([r[name] for r in mine], scale, digits)
            for name, scale, digits in (("kl", 1.0, 3), ("top1", 100.0, 1), ("ppl", 1.0, 2))
        )
        lines.append(
            f"| `{recipe}` | {kl} | {top1} | {ppl} | {100 * mean(r['compression_ratio'] for r in mine):.1f}% "
            f"| {len(mine)} |"
        )
    return [*lines, ""]


def _mib(records: list[dict], field: str) -> str:
    return f"{mean(r[field] for r in records) / 2**20:.2f}"


def _held_and_speed_cells(records: list[dict]) -> list[str]:
    """KV MiB at the end (and the full cache's for the same tokens), the peak, ms/token, n."""
    return [
        f"{_mib(records, 'kv_bytes')} / {_mib(records, 'kv_bytes_full')}",
        _mib(records, "kv_bytes_peak"),
        f"{mean(r['ms_per_token'] for r in records):.1f}",
        str(len(records)),
    ]


def _long_generation(records: list[dict]) -> list[str]:
    """Tables of the ``kvsqueeze.eval.longgen`` tasks: top-1 agreement per answer segment, and
    recall / counting scores, each with the bytes held at the answer's end and at the peak."""
    rows = [r for r in matched(records) if r["task"] in LONG_GENERATION]
    if not rows:
        return []
    lines = [
        "## Long generation",
        "",
        "KV MiB at the end of the answer and at the peak over the whole run (full: what the full "
        "cache holds for the same tokens); ms/token over the answer; bootstrap intervals over prompts.",
        "",
    ]
    fidelity_rows = [r for r in rows if r["task"] == "longgen_fidelity"]
    if fidelity_rows:
        ends = [seg["end"] for seg in max((r["segments"] for r in fidelity_rows), key=len)]
        starts = [0, *ends[:-1]]
        lines += [
            f"### Fidelity over a long answer ({fidelity_rows[0]['generated_tokens']} tokens)",
            "",
            "The full cache continues English prose greedily; every recipe is teacher-forced on that "
            "continuation. Top-1 agreement with the full cache (%) per segment of the answer, KL(full ‖ "
            "recipe) over the whole answer.",
            "",
            "| recipe | "
            + " | ".join(f"top-1 {a}–{b}" for a, b in zip(starts, ends, strict=True))
            + " | KL | KV MiB end / full | peak | ms/token | n |",
            "|" + "---|" * (len(ends) + 6),
        ]
        for recipe in recipe_order(fidelity_rows):
            mine = [r for r in fidelity_rows if r["recipe"] == recipe]
            cells = [
                _mean_with_bootstrap(
                    [r["segments"][i]["top1"] for r in mine if len(r["segments"]) > i], 100.0, 1
                )
                for i in range(len(ends))
            ]
            cells += [_mean_with_bootstrap([r["kl"] for r in mine], 1.0, 3), *_held_and_speed_cells(mine)]
            lines.append(f"| `{recipe}` | " + " | ".join(cells) + " |")
        lines.append("")
    for task, title in (
        ("longgen_recall", "Recall after a long answer"),
        ("longgen_count", "Counting rule kept"),
    ):
        task_rows = [r for r in rows if r["task"] == task]
        if not task_rows:
            continue
        full_score = {_sample_id(r): r["score"] for r in task_rows if r["recipe"] == FULL}
        lines += [
            f"### {title} (answers of up to {max(r['generated_tokens'] for r in task_rows)} tokens)",
            "",
            f"{LONG_GENERATION[task].capitalize()}. Score %, vs full on the same prompts (paired bootstrap).",
            "",
            "| recipe | score | vs full | KV MiB end / full | peak | ms/token | n |",
            "|---|---|---|---|---|---|---|",
        ]
        for recipe in recipe_order(task_rows):
            mine = [r for r in task_rows if r["recipe"] == recipe]
            scores = [r["score"] for r in mine]
            base = [full_score[_sample_id(r)] for r in mine]
            relative = (
                {"relative": mean(scores) / mean(base), "relative_interval": paired_ratio([scores], [base])}
                if mean(base) > 0
                else {"relative": None}
            )
            cells = [
                _with_interval(mean(scores), mean_interval([scores])),
                _relative_cell(relative),
                *_held_and_speed_cells(mine),
            ]
            lines.append(f"| `{recipe}` | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _mean_with_bootstrap(values: list[float], scale: float, digits: int) -> str:
    return _with_interval(mean(values), bootstrap_mean([values]), scale, digits)


def write_report(
    out_dir: Path, title: str = "kvsqueeze eval", plots: bool = True, target_vs_full: float | None = None
) -> tuple[str, list[Path]]:
    """Write ``summary.md`` (and the PNG plots) in ``out_dir`` from its ``results.jsonl``."""
    out_dir = Path(out_dir)
    records = load_records(out_dir)
    images: list[Path] = []
    if plots and records:
        from kvsqueeze.eval.plots import write_plots

        images = write_plots(records, out_dir)
    markdown = summary_markdown(records, title, target_vs_full)
    if images:
        markdown += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in images) + "\n"
    (out_dir / SUMMARY).write_text(markdown, encoding="utf-8")
    return markdown, images
