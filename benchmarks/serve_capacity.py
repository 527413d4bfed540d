"""Same ``--kv-memory``, full vs compressed recipe: concurrent sequences and tokens/s on loopback.

For each recipe, one server with the same KV budget (room for about ``FULL_SEQUENCES`` full-cache
requests) and prefix reuse off; ``CLIENTS`` concurrent openai clients each send one chat request
with its own ~``TOKENS``-token document (in an earlier turn, so it is the compressed context) and
``max_tokens`` answer tokens. Reported: the largest running batch the server reached (its
``kvsqueeze_running_sequences_max`` metric), peak KV bytes really held, preemptions, completion
tokens per second over the whole run (wall clock, prefill included) and the answers' hit rate.
Target: >= 3x more concurrent sequences at ratio 0.75 than with the full cache.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

from rich.console import Console
from rich.table import Table
from serve_support import THREADS_HELP, client, document, dump, metrics, server
from transformers import AutoConfig

from kvsqueeze.models import converted_checkpoint_dir, kv_cache_spec

FULL_SEQUENCES = 4


def token_bytes() -> int:
    """Bytes one token costs a running row of the default model in fp32 (keys, values, int32 slot)."""
    layers, kv_heads, head_dim = kv_cache_spec(AutoConfig.from_pretrained(converted_checkpoint_dir()))
    return layers * kv_heads * (2 * head_dim * 4 + 4)


def run(recipe: str, budget: int, clients: int, tokens: int, max_tokens: int, threads: int) -> dict:
    jobs = []
    for i in range(clients):
        code = 1000 + 37 * i
        text = document(tokens, seed=100 + i, fact=f"The code of the archive is {code}.")
        messages = [
            {"role": "user", "content": text},
            {"role": "assistant", "content": "OK."},
            {"role": "user", "content": "What is the code of the archive?"},
        ]
        jobs.append((messages, str(code)))

    options = (
        "--recipe",
        recipe,
        "--kv-memory",
        str(budget),
        "--prefix-cache",
        "0",
        "--threads",
        str(threads),
    )
    with server(*options) as base:

        def one(job):
            messages, code = job
            response = client(base).chat.completions.create(
                model="smollm2-135m", messages=messages, max_tokens=max_tokens
            )
            return response.usage.completion_tokens, code in (response.choices[0].message.content or "")

        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            outcomes = list(pool.map(one, jobs))
        elapsed = time.perf_counter() - start
        values = metrics(base)
    generated = sum(n for n, _ in outcomes)
    return {
        "recipe": recipe,
        "max_running": int(values["kvsqueeze_running_sequences_max"]),
        "peak_kv_bytes": int(values["kvsqueeze_kv_bytes_peak"]),
        "preemptions": int(values["kvsqueeze_preemptions_total"]),
        "completion_tokens": generated,
        "seconds": elapsed,
        "tokens_per_second": generated / elapsed,
        "answered": sum(ok for _, ok in outcomes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="full,snapkv@0.75")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=1000, help="document length per request, roughly")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--json", default=None)
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    args = parser.parse_args()
    # the chat template and question add ~60 tokens to each document
    budget = FULL_SEQUENCES * (args.tokens + 60 + args.max_tokens) * token_bytes()
    recipes = args.recipes.split(",")
    results = [run(r, budget, args.clients, args.tokens, args.max_tokens, args.threads) for r in recipes]
    base = results[0]
    table = Table(
        title=f"--kv-memory {budget / 2**20:.0f} MiB, {args.clients} concurrent clients, "
        f"~{args.tokens}-token documents, {args.max_tokens} new tokens"
    )
    for column in (
        "recipe",
        "max running",
        "x vs first",
        "peak KV MiB",
        "preempted",
        "tokens/s",
        "x vs first",
        "answered",
    ):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            r["recipe"],
            str(r["max_running"]),
            f"{r['max_running'] / base['max_running']:.2f}",
            f"{r['peak_kv_bytes'] / 2**20:.1f}",
            str(r["preemptions"]),
            f"{r['tokens_per_second']:.1f}",
            f"{r['tokens_per_second'] / base['tokens_per_second']:.2f}",
            f"{r['answered']}/{args.clients}",
        )
    Console().print(table)
    dump(args.json, {"budget_bytes": budget, "results": results})


if __name__ == "__main__":
    main()
