"""``transformers serve --continuous-batching`` next to ``kvsqueeze serve``, one after the other in one run.

Both serve the same files (the converted checkpoint of the default model, smollm2-135m), on CPU, fp32,
full (uncompressed) cache, the same KV budget (``KV_MEMORY``: kvsqueeze's ``--kv-memory``, the same
bytes as transformers' ``--cb-num-blocks``), the same torch thread count, and get the same requests
from the same bounded client (openai, streaming, temperature 0, the same ``max_tokens``):

- pasted document: ``--documents`` times a new ~``--tokens``-token document with a pass key in the
  middle, in one user message: cold, the identical request again (repeat), the same document with
  another question; TTFT medians and their ratios to cold;
- N clients: ``--clients`` threads, each sending ``--requests`` requests one after the other, each a
  ~``--prompt-tokens``-token document of its own with its own pass key; output tokens per second of
  wall time (tokens of the answers' text, by the model's tokenizer), p90 latency (request to last
  token), mean TTFT.

An answer is correct if it contains its pass key. Peak RSS: the server's process tree, sampled from
/proc while it serves (after its model is loaded). ``transformers serve`` needs ``accelerate``
(``transformers[serving]``): on CPU it loads the model with a device map.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table
from serve_support import (
    MODEL,
    THREADS_HELP,
    PeakRss,
    document,
    dump,
    server_process,
    timed_chat,
    transformers_server,
)
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from kvsqueeze.models import converted_checkpoint_dir, load_model

KV_MEMORY = 1 << 30
QUESTION = "What is the code of the archive?"
OTHER_QUESTION = "Which number is the code of the archive?"
KINDS = ("cold", "repeat", "other question")
SERVERS = ("transformers", "kvsqueeze")
LABELS = {"transformers": "`transformers serve` CB", "kvsqueeze": "`kvsqueeze serve`"}
PAGE_TOKENS = 256  # transformers' default continuous-batching page size


def fact(key: int) -> str:
    return f"The code of the archive is {key}."


def pass_key(seed: int) -> int:
    return random.Random(seed).randint(1000, 9999)


def kv_bytes_per_token(model_dir: Path) -> int:
    """fp32 K and V of every layer for one token."""
    config = json.loads((model_dir / "config.json").read_text())
    heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * heads * head_dim * 4


Ask = Callable[[list[dict], int], tuple[float, str, dict]]


@contextlib.contextmanager
def running(name: str, model_dir: Path, threads: int) -> Iterator[tuple[Ask, PeakRss]]:
    """The server ``name`` on ``model_dir``; yields a streaming chat call to it and its RSS sampler."""
    if name == "transformers":
        blocks = KV_MEMORY // (PAGE_TOKENS * kv_bytes_per_token(model_dir))
        launch = transformers_server(model_dir, "--cb-num-blocks", str(blocks), threads=threads)
        model = str(model_dir)  # a server pinned to a model refuses any other model name
    else:
        args = ("--model", str(model_dir), "--served-model-name", MODEL, "--recipe", "full")
        launch = server_process(*args, "--kv-memory", str(KV_MEMORY), "--threads", str(threads))
        model = MODEL
    with launch as (base, pid), PeakRss(pid) as rss:

        def ask(messages: list[dict], max_tokens: int) -> tuple[float, str, dict]:
            return timed_chat(
                base, messages, max_tokens, model=model, temperature=0, stream_options={"include_usage": True}
            )

        ask([{"role": "user", "content": "Hi"}], 4)  # warm-up: transformers sets up its batching here
        yield ask, rss


def pasted(ask: Ask, tokens: int, documents: int, max_tokens: int) -> dict:
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    answers = []
    for index in range(documents):
        key = pass_key(100 + index)
        text = document(tokens, seed=100 + index, fact=fact(key))
        questions = {"cold": QUESTION, "repeat": QUESTION, "other question": OTHER_QUESTION}
        for kind in KINDS:
            seconds, answer, _ = ask(
                [{"role": "user", "content": f"{text}\n\n{questions[kind]}"}], max_tokens
            )
            times[kind].append(seconds)
            answers.append({"kind": kind, "key": key, "answer": answer, "correct": str(key) in answer})
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    return {
        "median_ttft_s": medians,
        "ratio_to_cold": {kind: medians[kind] / medians["cold"] for kind in KINDS[1:]},
        "answers": answers,
    }


def clients(
    ask: Ask,
    count: int,
    requests: int,
    prompt_tokens: int,
    max_tokens: int,
    tokenizer: PreTrainedTokenizerBase,
) -> dict:
    start = threading.Barrier(count)

    def one_client(client: int) -> list[dict]:
        start.wait()
        results = []
        for request in range(requests):
            seed = 1000 + client * requests + request
            key = pass_key(seed)
            text = document(prompt_tokens, seed=seed, fact=fact(key))
            sent = time.perf_counter()
            ttft, answer, info = ask([{"role": "user", "content": f"{text}\n\n{QUESTION}"}], max_tokens)
            results.append(
                {
                    "ttft_s": ttft,
                    "latency_s": time.perf_counter() - sent,
                    # the servers' own counts differ (transformers counts the end-of-sequence token)
                    "answer_tokens": len(tokenizer.encode(answer, add_special_tokens=False)),
                    "completion_tokens": info.get("completion_tokens"),
                    "prompt_tokens": info.get("prompt_tokens"),
                    "key": key,
                    "answer": answer,
                    "correct": str(key) in answer,
                }
            )
        return results

    began = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        results = [r for rs in pool.map(one_client, range(count)) for r in rs]
    wall = time.perf_counter() - began
    latencies = [r["latency_s"] for r in results]
    return {
        "wall_s": wall,
        "output_tokens_per_s": sum(r["answer_tokens"] for r in results) / wall,
        "p90_latency_s": statistics.quantiles(latencies, n=10)[8] if len(latencies) > 1 else latencies[0],
        "mean_ttft_s": statistics.mean(r["ttft_s"] for r in results),
        "requests": results,
    }


def measure(name: str, model_dir: Path, args: argparse.Namespace) -> dict:
    began = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with running(name, model_dir, args.threads) as (ask, rss):
        result = {
            "pasted": pasted(ask, args.tokens, args.documents, args.max_tokens),
            "clients": clients(
                ask, args.clients, args.requests, args.prompt_tokens, args.max_tokens, tokenizer
            ),
        }
    answers = result["pasted"]["answers"] + result["clients"]["requests"]
    result.update(
        peak_rss_bytes=rss.peak,
        correct=sum(a["correct"] for a in answers),
        answers_total=len(answers),
        seconds=time.perf_counter() - began,
    )
    return result


def table(results: dict[str, dict], args: argparse.Namespace) -> Table:
    out = Table(
        title=f"~{args.tokens}-token documents x {args.documents}; {args.clients} clients x {args.requests} "
        f"requests of ~{args.prompt_tokens} tokens; max_tokens {args.max_tokens}; {args.threads} thread(s)"
    )
    out.add_column("")
    for name in SERVERS:
        out.add_column(LABELS[name], justify="right")
    rows = {
        "TTFT, document in one user message: cold (s, median)": lambda r: (
            f"{r['pasted']['median_ttft_s']['cold']:.2f}"
        ),
        "repeat / cold": lambda r: f"{r['pasted']['ratio_to_cold']['repeat']:.3f}",
        "same document, another question / cold": lambda r: (
            f"{r['pasted']['ratio_to_cold']['other question']:.3f}"
        ),
        f"N = {args.clients} clients: output tok/s": lambda r: f"{r['clients']['output_tokens_per_s']:.2f}",
        f"N = {args.clients}: p90 latency / mean TTFT (s)": lambda r: (
            f"{r['clients']['p90_latency_s']:.1f} / {r['clients']['mean_ttft_s']:.1f}"
        ),
        "peak RSS": lambda r: f"{r['peak_rss_bytes'] / 1e9:.1f} GB",
        "answers correct (pass keys)": lambda r: f"{r['correct']}/{r['answers_total']}",
    }
    for label, cell in rows.items():
        out.add_row(label, *(cell(results[name]) for name in SERVERS))
    return out


def in_range(
    parser: argparse.ArgumentParser, args: argparse.Namespace, name: str, low: int, high: int
) -> None:
    value = getattr(args, name)
    if not low <= value <= high:
        parser.error(f"--{name.replace('_', '-')} must be in {low}..{high}, not {value}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokens", type=int, default=2000, help="pasted document length, roughly (default 2000)"
    )
    parser.add_argument("--documents", type=int, default=3, help="pasted documents per server (default 3)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients N (default 8)")
    parser.add_argument(
        "--prompt-tokens", type=int, default=500, help="each client request's length, roughly (default 500)"
    )
    parser.add_argument("--requests", type=int, default=3, help="requests per client, in turn (default 3)")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of every request (default 16)")
    parser.add_argument(
        "--first", choices=SERVERS, default="transformers", help="server run first (default %(default)s)"
    )
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    parser.add_argument("--out", default=None, help="also write every measurement as JSON to this file")
    args = parser.parse_args()
    in_range(parser, args, "tokens", 100, 7000)
    in_range(parser, args, "documents", 1, 20)
    in_range(parser, args, "clients", 1, 64)
    in_range(parser, args, "prompt_tokens", 50, 4000)
    in_range(parser, args, "requests", 1, 50)
    in_range(parser, args, "max_tokens", 1, 512)
    in_range(parser, args, "threads", 1, os.cpu_count() or 1)
    needed = args.clients * (args.prompt_tokens + args.max_tokens + 64) * kv_bytes_per_token(model_files())
    if needed > KV_MEMORY:
        parser.error(
            f"--clients x (--prompt-tokens + --max-tokens) do not fit the {KV_MEMORY >> 20} MiB KV budget"
        )
    if importlib.util.find_spec("accelerate") is None:
        parser.error("transformers serve needs accelerate (transformers[serving]): pip install accelerate")
    return args


def model_files() -> Path:
    """The default model's converted checkpoint, converted now if it was not yet."""
    if not converted_checkpoint_dir().is_dir():
        load_model()
    return converted_checkpoint_dir()


def load_average() -> tuple[float, ...]:
    return tuple(round(load, 2) for load in os.getloadavg())


def main() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    args = parse_args()
    model_dir = model_files()
    order = (args.first, *(name for name in SERVERS if name != args.first))
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_start = load_average()
    results = {name: measure(name, model_dir, args) for name in order}
    load_end = load_average()
    Console(width=140).print(table(results, args))
    print(f"model files: {model_dir}; KV budget {KV_MEMORY >> 20} MiB each")
    print(f"ran first: {order[0]}, then {order[1]} (one after the other, never together)")
    print(f"started {started}; load average (1, 5, 15 min) at start {load_start}, at end {load_end}")
    for name in order:
        print(f"{name}: {results[name]['seconds']:.0f} s")
    dump(
        args.out,
        {
            "args": vars(args),
            "order": order,
            "load_average": {"start": load_start, "end": load_end},
            **results,
        },
    )


if __name__ == "__main__":
    main()
