"""Choose a method's option on text no eval task uses: logit fidelity vs the full cache on docstrings.

The eval's `fidelity` task holds prose from the Language Reference, the same text the needle tasks'
haystacks come from; an option tuned there is tuned on the test. This script measures the same
quantities (next-token KL(full || recipe), top-1 agreement, over a teacher-forced continuation
after a compressed prefix) on seeded windows of the standard library's docstrings
(`kvsqueeze.calibration_text`), each recipe on the same windows as the full cache, with a 95%
bootstrap interval over the windows. Fix --prompts before the run.

    python calibration_fidelity.py --recipes snapkv@0.875,snapkv+kvmerger:threshold=0.5@0.875
"""

from __future__ import annotations

import argparse
import json
import random
import sys

from rich.console import Console
from rich.progress import track
from rich.table import Table

from kvsqueeze import Recipe, load_model
from kvsqueeze.calibration_text import SOURCE, docstring_paragraphs
from kvsqueeze.engine import continuation_logits
from kvsqueeze.eval.intervals import bootstrap_mean
from kvsqueeze.eval.metrics import fidelity


def windows(tokenizer, count: int, length: int, continuation: int, seed: int) -> list[tuple[list, list]]:
    """``count`` seeded (prefix, continuation) token windows of the docstrings' prose."""
    ids = tokenizer.encode("\n\n".join(docstring_paragraphs()), add_special_tokens=False)
    need = length + continuation
    rng = random.Random(seed)
    starts = [rng.randrange(len(ids) - need + 1) for _ in range(count)]
    return [(ids[s : s + length], ids[s + length : s + need]) for s in starts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", required=True, help="comma-separated recipes compared with `full`")
    parser.add_argument("--prompts", type=int, default=5, help="docstring windows (default 5)")
    parser.add_argument("--length", type=int, default=1024, help="prefix tokens (default 1024)")
    parser.add_argument("--continuation", type=int, default=128, help="teacher-forced tokens (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the window offsets (default 0)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", help="also write one JSON line per (recipe, window) here")
    args = parser.parse_args()
    if min(args.prompts, args.length, args.continuation) < 1:
        sys.exit("error: --prompts, --length and --continuation must be at least 1")
    try:
        recipes = [str(Recipe.parse(name)) for name in args.recipes.split(",")]
    except ValueError as error:
        sys.exit(f"error: {error}")
    model, tokenizer = load_model(args.model)
    rows = []
    cases = windows(tokenizer, args.prompts, args.length, args.continuation, args.seed)
    for index, (context, following) in enumerate(track(cases, description="windows")):
        full = continuation_logits(model, context, following, "full", tokenizer=tokenizer)
        for recipe in recipes:
            result = continuation_logits(model, context, following, recipe, tokenizer=tokenizer)
            rows.append(
                {"recipe": recipe, "window": index, **fidelity(full.logits, result.logits, following)}
            )
    if args.out:
        with open(args.out, "w") as out:
            out.writelines(json.dumps(row) + "\n" for row in rows)
    table = Table(
        title=f"fidelity vs full on {args.prompts} windows of {args.length} + {args.continuation} tokens, "
        f"{SOURCE}, seed {args.seed}; [95% bootstrap]"
    )
    for column in ("recipe", "KL", "top-1"):
        table.add_column(column, justify="right")
    for recipe in recipes:
        mine = [row for row in rows if row["recipe"] == recipe]
        cells = []
        for metric in ("kl", "top1"):
            values = [row[metric] for row in mine]
            interval = bootstrap_mean([values])
            cells.append(f"{sum(values) / len(values):.3f} [{interval.low:.3f}, {interval.high:.3f}]")
        table.add_row(recipe, *cells)
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
