"""How long a ~4k-token prompt joining stalls the answers being decoded: a token budget per step
(``--max-step-tokens``, Sarathi-Serve) vs prefilling the whole prompt in one step (as before).

In process (the serve ``Runner``, no HTTP), the default model, one run, the two settings
interleaved ``REPEATS`` times: four short chat requests decode; after a few of their tokens the
long prompt is submitted. Per setting: the longest wait between two tokens of a decoding stream
(wall time, the median over rounds), the long prompt's time to first token and whether its greedy
answer is the same under both settings. The CPU is shared with other work: read the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from serve_support import document

from kvsqueeze import Recipe, load_model
from kvsqueeze.serve.runner import Runner
from kvsqueeze.serve.scheduler import Sequence

WHOLE = 1 << 30  # a budget no prompt reaches: each prompt is prefilled in one step


class Clock:
    """A sink that keeps when each token came."""

    def __init__(self):
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.ended = False

    def __call__(self, event: str, value: object) -> None:
        if event == "token":
            self.times.append(time.perf_counter())
            self.tokens.append(int(value))
        elif event in ("done", "error"):
            self.ended = True


def run(model, tokenizer, recipe: Recipe, budget: int, long_ids: list[int], short: list[list[int]]) -> dict:
    runner = Runner(model, recipe, kv_memory=4 << 30, max_step_tokens=budget, tokenizer=tokenizer)
    streams = [Sequence(context=[], prompt=ids, max_tokens=64, sink=Clock()) for ids in short]
    long = Sequence(context=long_ids[:-16], prompt=long_ids[-16:], max_tokens=8, sink=Clock())
    for seq in streams:
        runner.submit(seq)
    while min(len(seq.sink.tokens) for seq in streams) < 4:
        runner.step()
    submitted = time.perf_counter()
    runner.submit(long)
    while not long.sink.ended:
        runner.step()
    waits = [
        later - earlier
        for seq in streams
        for earlier, later in zip(seq.sink.times, seq.sink.times[1:], strict=False)
        if later > submitted
    ]
    return {
        "longest_wait": max(waits),
        "ttft": long.sink.times[0] - submitted,
        "answer": long.sink.tokens,
        "max_step_prefill_tokens": runner.stats.max_step_prefill_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="snapkv@0.75")
    parser.add_argument("--tokens", type=int, default=4000, help="long prompt length (default 4000)")
    parser.add_argument("--budget", type=int, default=512, help="--max-step-tokens (default 512)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model, tokenizer = load_model()
    recipe = Recipe.parse(args.recipe)
    long_ids = tokenizer.encode(document(args.tokens, seed=1, fact="The code is 6052."))[: args.tokens]
    short = [
        tokenizer.encode(f"Write a short story about a {word}.") for word in ("cat", "ship", "tree", "map")
    ]
    results: dict[str, list[dict]] = {"budget": [], "whole": []}
    for _ in range(args.repeats):
        for name, budget in (("budget", args.budget), ("whole", WHOLE)):
            results[name].append(run(model, tokenizer, recipe, budget, long_ids, short))
    summary = {
        "recipe": args.recipe,
        "long_prompt_tokens": len(long_ids),
        "max_step_tokens": args.budget,
        "threads": args.threads,
        "repeats": args.repeats,
    }
    for name, rounds in results.items():
        summary[name] = {
            "longest_wait_s": round(statistics.median(r["longest_wait"] for r in rounds), 3),
            "ttft_s": round(statistics.median(r["ttft"] for r in rounds), 3),
            "max_step_prefill_tokens": rounds[0]["max_step_prefill_tokens"],
        }
    summary["wait_ratio_whole_over_budget"] = round(
        summary["whole"]["longest_wait_s"] / summary["budget"]["longest_wait_s"], 2
    )
    summary["ttft_ratio_budget_over_whole"] = round(
        summary["budget"]["ttft_s"] / summary["whole"]["ttft_s"], 2
    )
    answers = {tuple(r["answer"]) for rounds in results.values() for r in rounds}
    summary["same_answer"] = len(answers) == 1
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
