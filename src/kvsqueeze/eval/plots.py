"""PNG plots of an eval directory (matplotlib, headless Agg backend).

- ``score_vs_ratio[-MODE].png``: mean score over tasks against the real reduction of KV bytes
  against a 16-bit full cache (the papers' reference; older records without 16-bit bytes: the
  compression ratio in the model's dtype), one line per method with 95% error bars, the full cache
  dashed with its interval shaded.
- ``needle_heatmap[-MODE].png``: score of the single-needle tasks by needle depth x context
  length, one panel per recipe (rows: methods, columns: ratios).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

from kvsqueeze.eval.report import matched, recipe_order, summarize
from kvsqueeze.eval.runner import FULL
from kvsqueeze.eval.tasks import TASKS


def _method(recipe: str) -> str:
    return recipe.rpartition("@")[0] or recipe


def _suffix(mode: str, modes: list[str]) -> str:
    return "" if len(modes) == 1 or mode == "query-agnostic" else f"-{mode}"


def write_plots(records: list[dict], out_dir: Path) -> list[Path]:
    """Write every plot the records allow; returns the PNG paths."""
    paths = []
    table = summarize(records)
    modes = list(table)
    for mode, block in table.items():
        if block["rows"]:
            paths.append(_score_vs_ratio(block, mode, out_dir / f"score_vs_ratio{_suffix(mode, modes)}.png"))
        heat = _needle_heatmap(records, mode, out_dir / f"needle_heatmap{_suffix(mode, modes)}.png")
        if heat:
            paths.append(heat)
    return paths


def _score_vs_ratio(block: dict, mode: str, path: Path) -> Path:
    # against a 16-bit full cache when every row has those bytes (older runs: the model's dtype)
    sixteen = all(row["reduction_16bit"] is not None for row in block["rows"].values())
    lines = defaultdict(list)
    for recipe, row in block["rows"].items():
        if recipe != FULL:
            x = row["reduction_16bit"] if sixteen else 100 * row["ratio"]
            interval = row["interval"]
            lines[_method(recipe)].append((x, 100 * row["mean"], 100 * interval.low, 100 * interval.high))
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    cmap = plt.get_cmap("tab10" if len(lines) <= 10 else "tab20")
    for i, (method, points) in enumerate(sorted(lines.items())):
        xs, ys, lows, highs = zip(*sorted(points), strict=True)
        errors = [
            [y - low for y, low in zip(ys, lows, strict=True)],
            [h - y for y, h in zip(ys, highs, strict=True)],
        ]
        ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=method, color=cmap(i % cmap.N))
    if block["full_mean"] is not None:
        ax.axhline(100 * block["full_mean"], color="black", linestyle="--", linewidth=1.2, label="full cache")
        full = block["full_interval"]
        ax.axhspan(100 * full.low, 100 * full.high, color="black", alpha=0.08, linewidth=0)
    if sixteen:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
        ax.set_xlabel("real reduction against a 16-bit full cache (x, log scale)")
    else:
        ax.set_xlabel("real compression ratio (% of KV bytes removed)")
    ax.set_ylabel("mean score over tasks (%)")
    tasks = ", ".join(block["tasks"])
    ax.set_title(f"Score vs compression ({mode}), 95% intervals\n{tasks}", fontsize=9)
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _needle_heatmap(records: list[dict], mode: str, path: Path) -> Path | None:
    needle_tasks = {name for name, spec in TASKS.items() if spec.needle}
    rows = [
        r
        for r in matched(records)
        if r["mode"] == mode and r["task"] in needle_tasks and r.get("depth") is not None
    ]
    if not rows:
        return None
    depths = sorted({r["depth"] for r in rows})
    lengths = sorted({r["length"] for r in rows})
    cells = defaultdict(list)
    for r in rows:
        cells[(r["recipe"], r["depth"], r["length"])].append(r["score"])
    recipes = recipe_order(rows)
    methods = _order_methods(recipes)
    columns = max(len(rs) for rs in methods.values())
    fig, axes = plt.subplots(
        len(methods),
        columns,
        figsize=(1.0 + 1.9 * columns, 0.6 + 1.55 * len(methods)),
        dpi=100,
        squeeze=False,
        layout="constrained",
    )
    image = None
    for row, (_method_name, method_recipes) in enumerate(methods.items()):
        for col in range(columns):
            ax = axes[row][col]
            if col >= len(method_recipes):
                ax.axis("off")
                continue
            recipe = method_recipes[col]
            grid = [
                [mean(cells[(recipe, d, n)]) if cells[(recipe, d, n)] else float("nan") for n in lengths]
                for d in depths
            ]
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            for i, values in enumerate(grid):
                for j, value in enumerate(values):
                    if value == value:  # not NaN
                        ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=6)
            ax.set_title(recipe, fontsize=7)
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=6)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=6)
    fig.suptitle(
        f"Single-needle score (%) by depth (rows) x length (columns), {mode}: "
        + ", ".join(sorted({r["task"] for r in rows})),
        fontsize=8,
    )
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.4, label="score")
    fig.savefig(path)
    plt.close(fig)
    return path


def _order_methods(recipes: list[str]) -> dict[str, list[str]]:
    methods: dict[str, list[str]] = {}
    for recipe in recipes:
        methods.setdefault(_method(recipe), []).append(recipe)
    return methods
