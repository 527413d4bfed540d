"""The summary of an eval directory: markdown tables rendered from ``results.jsonl`` alone.

Scores are RULER string-match percentages. Every comparison with the full cache uses only the
samples the full cache also answered in that directory (same task, length, sample index, mode).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean

from kvsqueeze.eval.runner import FULL, load_records
from kvsqueeze.eval.tasks import FIDELITY, TASKS

SUMMARY = "summary.md"


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


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _label_lengths(lengths: list[int]) -> str:
    return ", ".join(f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in sorted(lengths))


def reduction_16bit(records: list[dict]) -> float | None:
    """Bytes of a 16-bit full cache / bytes held with the model's KV at 16 bits, over ``records``
    (None for records written before these fields existed)."""
    if not records or any("kv_bytes_16bit" not in r for r in records):
        return None
    return sum(r["kv_bytes_full_16bit"] for r in records) / sum(r["kv_bytes_16bit"] for r in records)


def summarize(records: list[dict]) -> dict:
    """Per (mode, recipe): mean score per task, mean over tasks, relative to full, ratio, samples."""
    records = [r for r in matched(records) if r["task"] != FIDELITY]
    table: dict = {}
    for mode in _order(r["mode"] for r in records):
        rows = [r for r in records if r["mode"] == mode]
        tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
        per = defaultdict(list)
        for r in rows:
            per[(r["recipe"], r["task"])].append(r["score"])
        out = {}
        for recipe in recipe_order(rows):
            scores = {t: mean(per[(recipe, t)]) for t in tasks if per[(recipe, t)]}
            mine = [r for r in rows if r["recipe"] == recipe]
            out[recipe] = {
                "tasks": scores,
                "mean": mean(scores.values()) if scores else None,
                "ratio": mean(r["compression_ratio"] for r in mine),
                "reduction_16bit": reduction_16bit(mine),
                "kv_dtype": mine[0]["kv_dtype"],
                "samples": len(mine),
                "complete": len(scores) == len(tasks),
            }
        full_mean = out.get(FULL, {}).get("mean")
        full_score = {_sample_id(r): r["score"] for r in rows if r["recipe"] == FULL}
        for recipe, row in out.items():
            # relative to full on exactly this recipe's samples (a partial run compares like with like)
            base_per = defaultdict(list)
            for r in rows:
                if r["recipe"] == recipe:
                    base_per[r["task"]].append(full_score[_sample_id(r)])
            base = mean(mean(v) for v in base_per.values()) if base_per else 0.0
            row["relative"] = row["mean"] / base if row["mean"] is not None and base > 0 else None
        table[mode] = {"tasks": tasks, "rows": out, "full_mean": full_mean}
    return table


def summary_markdown(records: list[dict], title: str = "kvsqueeze eval") -> str:
    """Markdown tables: scores per task, by length, multi-turn turns, fidelity; plot links."""
    if not records:
        return f"# {title}\n\nNo results yet.\n"
    first = records[0]
    lengths = _order(r["length"] for r in records)
    samples = len({(r["task"], r["length"], r["sample"]) for r in records})
    lines = [
        f"# {title}",
        "",
        f"Model `{first['model']}`, lengths {_label_lengths(lengths)} tokens, seed {first['seed']}, "
        f"{samples} (task, length, sample) prompts. Scores: RULER string match, % of expected answers "
        "found (whole words, case-insensitive). **ratio** = 1 − KV bytes held / bytes of a full "
        f"{first['kv_dtype']} cache of the same tokens, measured after prefill. **x 16-bit** = bytes of "
        "a 16-bit full cache / bytes this cache holds with the model's KV in 16 bits (codes, scales and "
        "indices unchanged), the papers' reference. **vs full** = mean score / full-cache mean on the "
        "same samples.",
        "",
    ]
    for mode, block in summarize(records).items():
        tasks = block["tasks"]
        lines += [f"## Scores ({mode})", ""]
        if mode == "query-agnostic":
            lines += ["The context is compressed before the question is seen.", ""]
        else:
            lines += ["The context is compressed with the (first) question visible and protected.", ""]
        header = ["recipe", *tasks, "mean", "vs full", "ratio", "x 16-bit", "KV dtype", "n"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for recipe, row in block["rows"].items():
            cells = [_pct(row["tasks"].get(t)) for t in tasks]
            relative = "–" if row["relative"] is None else f"{row['relative']:.2f}"
            mean_cell = _pct(row["mean"]) + ("" if row["complete"] else "*")
            lines.append(
                "| "
                + " | ".join(
                    [
                        f"`{recipe}`",
                        *cells,
                        mean_cell,
                        relative,
                        f"{100 * row['ratio']:.1f}%",
                        "–" if row["reduction_16bit"] is None else f"{row['reduction_16bit']:.1f}x",
                        row["kv_dtype"],
                        str(row["samples"]),
                    ]
                )
                + " |"
            )
        if any(not row["complete"] for row in block["rows"].values()):
            lines += ["", "\\* not every task finished for this recipe: mean over the finished ones."]
        lines.append("")
        lines += _by_length(records, mode)
        lines += _multiturn(records, mode)
    lines += _fidelity(records)
    return "\n".join(lines).rstrip() + "\n"


def _by_length(records: list[dict], mode: str) -> list[str]:
    rows = [r for r in matched(records) if r["mode"] == mode and r["task"] != FIDELITY]
    lengths = sorted(_order(r["length"] for r in rows))
    if len(lengths) < 2:
        return []
    per = defaultdict(list)
    for r in rows:
        per[(r["recipe"], r["length"])].append(r["score"])
    lines = [f"### Mean score by length ({mode})", "", "| recipe | " + " | ".join(map(str, lengths)) + " |"]
    lines.append("|" + "---|" * (len(lengths) + 1))
    for recipe in recipe_order(rows):
        cells = [_pct(mean(per[(recipe, n)])) if per[(recipe, n)] else "–" for n in lengths]
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
        first = mean(r["turn_scores"][0] for r in mine)
        later = mean(s for r in mine for s in r["turn_scores"][1:])
        lines.append(f"| `{recipe}` | {_pct(first)} | {_pct(later)} | {len(mine)} |")
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
        "of the held tokens (full-cache perplexity in the first row).",
        "",
        "| recipe | KL | top-1 agree | perplexity | ratio | n |",
        "|---|---|---|---|---|---|",
    ]
    for recipe in recipe_order(rows):
        mine = [r for r in rows if r["recipe"] == recipe]
        lines.append(
            f"| `{recipe}` | {mean(r['kl'] for r in mine):.3f} | {_pct(mean(r['top1'] for r in mine))}% "
            f"| {mean(r['ppl'] for r in mine):.2f} | {100 * mean(r['compression_ratio'] for r in mine):.1f}% "
            f"| {len(mine)} |"
        )
    return [*lines, ""]


def write_report(out_dir: Path, title: str = "kvsqueeze eval", plots: bool = True) -> tuple[str, list[Path]]:
    """Write ``summary.md`` (and the PNG plots) in ``out_dir`` from its ``results.jsonl``."""
    out_dir = Path(out_dir)
    records = load_records(out_dir)
    images: list[Path] = []
    if plots and records:
        from kvsqueeze.eval.plots import write_plots

        images = write_plots(records, out_dir)
    markdown = summary_markdown(records, title)
    if images:
        markdown += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in images) + "\n"
    (out_dir / SUMMARY).write_text(markdown, encoding="utf-8")
    return markdown, images
