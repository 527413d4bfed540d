"""Time to first token for a document pasted into the user message, as OpenAI clients send it.

For each recipe, one server (prefix reuse on, the defaults otherwise), and ``REPEATS`` times, each
time on a new ~``--tokens``-token document (so "cold" is really cold):

- cold: the document and a question in one user message;
- repeat: the identical request again (the whole context is reused: the state at its end);
- other question: the same document with another question (the context, all but the question,
  is the same, so it is reused whole too).

TTFT is measured by the client (openai, streaming) to the first generated text; ratios are
median(repeat or other) / median(cold), next to each kind's median ``cached_tokens`` /
``prompt_tokens``. Target
(server issue): repeat and other question <= 0.12x cold, as ``transformers serve
--continuous-batching`` measured 0.119 and 0.130 on this machine.
"""

from __future__ import annotations

import argparse
import statistics

from rich.console import Console
from rich.table import Table
from serve_support import THREADS_HELP, document, dump, server, timed_chat

FACT = "The code of the archive is 6052."
QUESTION = "What is the code of the archive?"
OTHER_QUESTION = "Which number is the code of the archive?"
KINDS = ("cold", "repeat", "other question")


def measure(recipe: str, tokens: int, repeats: int, threads: int) -> dict:
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    cached: dict[str, list[float]] = {kind: [] for kind in KINDS}
    answers: dict[str, str] = {}
    with server("--recipe", recipe, "--kv-memory", "1GiB", "--threads", str(threads)) as base:
        timed_chat(base, [{"role": "user", "content": "Hi"}])  # warm-up
        for repeat in range(repeats):
            text = document(tokens, seed=100 + repeat, fact=FACT)
            asks = {
                "cold": [{"role": "user", "content": f"{text}\n\n{QUESTION}"}],
                "repeat": [{"role": "user", "content": f"{text}\n\n{QUESTION}"}],
                "other question": [{"role": "user", "content": f"{text}\n\n{OTHER_QUESTION}"}],
            }
            for kind in KINDS:
                seconds, answers[kind], info = timed_chat(
                    base, asks[kind], max_tokens=12, stream_options={"include_usage": True}
                )
                times[kind].append(seconds)
                cached[kind].append(info["cached_tokens"] / info["prompt_tokens"])
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    return {
        "recipe": recipe,
        "median_seconds": medians,
        "ratio_to_cold": {kind: medians[kind] / medians["cold"] for kind in KINDS[1:]},
        "cached_of_prompt": {kind: statistics.median(values) for kind, values in cached.items()},
        "answers": answers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="full,snapkv@0.75", help="comma-separated: %(default)s")
    parser.add_argument("--tokens", type=int, default=2000, help="document length, roughly (default 2000)")
    parser.add_argument("--repeats", type=int, default=3, help="documents per recipe (default 3)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    args = parser.parse_args()
    results = [measure(recipe, args.tokens, args.repeats, args.threads) for recipe in args.recipes.split(",")]
    table = Table(
        title=f"TTFT, ~{args.tokens}-token document in the user message, median of {args.repeats}, "
        f"{args.threads} torch thread(s)"
    )
    columns = ("recipe", "cold s", "repeat s", "other s", "repeat/cold", "other/cold", "cached of prompt")
    for column in columns:
        table.add_column(column, justify="right")
    for r in results:
        m, ratio, cached = r["median_seconds"], r["ratio_to_cold"], r["cached_of_prompt"]
        table.add_row(
            r["recipe"],
            *(f"{m[kind]:.2f}" for kind in KINDS),
            *(f"{ratio[kind]:.3f}" for kind in KINDS[1:]),
            ", ".join(f"{cached[kind]:.0%}" for kind in KINDS),
        )
    Console().print(table)
    for r in results:
        print(f"{r['recipe']} answers: {r['answers']}")
    dump(args.json, {"results": results})


if __name__ == "__main__":
    main()
