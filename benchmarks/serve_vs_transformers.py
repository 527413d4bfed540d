"""``transformers serve --continuous-batching`` next to ``kvsqueeze serve``, one after the other in one run.

Both serve the same files (the converted checkpoint of the default model, smollm2-135m), on CPU, fp32,
kvsqueeze once per ``--recipes`` entry (default ``full``, the uncompressed cache, and ``snapkv@0.75``;
``kvzip+global@0.75`` is accepted but slow on CPU), the same KV budget (``KV_MEMORY``: kvsqueeze's
``--kv-memory``, the same bytes as transformers' ``--cb-num-blocks``), the same torch thread count, and
get the same requests from the same bounded client (openai, streaming, temperature 0, the same
``max_tokens``):

- pasted document: ``--documents`` times a new ~``--tokens``-token document with a pass key in the
  middle, in one user message: cold, the identical request again (repeat), the same document with
  another question; TTFT medians and their ratios to cold;
- N clients, for each N of ``--clients``: N threads, each sending ``--requests`` requests one after
  the other, each a ~``--prompt-tokens``-token document of its own with its own pass key; output
  tokens per second of wall time (tokens of the answers' text, by the model's tokenizer), p50/p90
  TTFT, p50/p90 latency (request to last token), failed requests.

An answer is correct if it contains its pass key (a failed request is not correct). The targets (the
issue's) are printed under the table, each met or not met: repeat and another-question TTFT <= 0.12x
cold; at the largest N, kvsqueeze ``full`` >= 1.5x transformers' output tok/s and every kvsqueeze
column's p90 TTFT <= half of transformers'; kvsqueeze peak RSS <= half of transformers'; every
answer correct. Transformers' KV is capped with ``--cb-num-blocks`` to kvsqueeze's budget: without the
cap it sizes its cache from 90% of the free RAM. Peak RSS: the server's process tree, sampled from
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
from kvsqueeze.recipe import Recipe, RecipeError, split_recipes

KV_MEMORY = 1 << 30
QUESTION = "What is the code of the archive?"
OTHER_QUESTION = "Which number is the code of the archive?"
KINDS = ("cold", "repeat", "other question")
TRANSFORMERS = "transformers"
FIRST = (TRANSFORMERS, "kvsqueeze")
RATIO_TARGET = 0.12  # repeat and another-question TTFT, at most this times cold
SPEEDUP_TARGET = 1.5  # kvsqueeze full's output tok/s at the largest N, at least this times transformers'
HALF = 0.5  # kvsqueeze's peak RSS and p90 TTFT at the largest N, at most this times transformers'
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
    """The server ``name`` (``transformers`` or a kvsqueeze recipe) on ``model_dir``; yields a streaming
    chat call to it and its RSS sampler."""
    if name == TRANSFORMERS:
        blocks = KV_MEMORY // (PAGE_TOKENS * kv_bytes_per_token(model_dir))
        launch = transformers_server(model_dir, "--cb-num-blocks", str(blocks), threads=threads)
        model = str(model_dir)  # a server pinned to a model refuses any other model name
    else:
        args = ("--model", str(model_dir), "--served-model-name", MODEL, "--recipe", name)
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


def quantile(values: list[float], q: int) -> float | None:
    """The ``q``-th percentile (interpolated between samples), None without samples."""
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


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
            seed = 10_000 * count + client * requests + request  # a new document per N, client, request
            key = pass_key(seed)
            text = document(prompt_tokens, seed=seed, fact=fact(key))
            sent = time.perf_counter()
            try:
                ttft, answer, info = ask([{"role": "user", "content": f"{text}\n\n{QUESTION}"}], max_tokens)
            except Exception as error:  # a failed request is counted, not fatal
                results.append({"key": key, "error": f"{type(error).__name__}: {error}", "correct": False})
                continue
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
    served = [r for r in results if "error" not in r]
    ttfts = [r["ttft_s"] for r in served]
    latencies = [r["latency_s"] for r in served]
    return {
        "wall_s": wall,
        "output_tokens_per_s": sum(r["answer_tokens"] for r in served) / wall,
        "p50_ttft_s": quantile(ttfts, 50),
        "p90_ttft_s": quantile(ttfts, 90),
        "p50_latency_s": quantile(latencies, 50),
        "p90_latency_s": quantile(latencies, 90),
        "errors": len(results) - len(served),
        "correct": sum(r["correct"] for r in results),
        "requests": results,
    }


def measure(name: str, model_dir: Path, args: argparse.Namespace) -> dict:
    began = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with running(name, model_dir, args.threads) as (ask, rss):
        result = {
            "pasted": pasted(ask, args.tokens, args.documents, args.max_tokens),
            "clients": {
                str(count): clients(ask, count, args.requests, args.prompt_tokens, args.max_tokens, tokenizer)
                for count in args.clients
            },
        }
    answers = result["pasted"]["answers"] + [r for run in result["clients"].values() for r in run["requests"]]
    result.update(
        peak_rss_bytes=rss.peak,
        correct=sum(a["correct"] for a in answers),
        answers_total=len(answers),
        seconds=time.perf_counter() - began,
    )
    return result


def label(name: str) -> str:
    return "`transformers serve` CB" if name == TRANSFORMERS else f"`kvsqueeze serve` {name}"


def seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def table(results: dict[str, dict], names: list[str], args: argparse.Namespace) -> Table:
    counts = ", ".join(map(str, args.clients))
    out = Table(
        title=f"~{args.tokens}-token documents x {args.documents}; N = {counts} clients x {args.requests} "
        f"requests of ~{args.prompt_tokens} tokens; max_tokens {args.max_tokens}; {args.threads} thread(s)"
    )
    out.add_column("")
    for name in names:
        out.add_column(label(name), justify="right")
    rows: dict[str, Callable[[dict], str]] = {
        "TTFT, document in one user message: cold (s, median)": lambda r: (
            f"{r['pasted']['median_ttft_s']['cold']:.2f}"
        ),
        "repeat / cold": lambda r: f"{r['pasted']['ratio_to_cold']['repeat']:.3f}",
        "same document, another question / cold": lambda r: (
            f"{r['pasted']['ratio_to_cold']['other question']:.3f}"
        ),
    }
    for count in args.clients:
        key = str(count)
        rows |= {
            f"N = {count}: output tok/s": lambda r, k=key: f"{r['clients'][k]['output_tokens_per_s']:.2f}",
            f"N = {count}: TTFT p50 / p90 (s)": lambda r, k=key: (
                f"{seconds(r['clients'][k]['p50_ttft_s'])} / {seconds(r['clients'][k]['p90_ttft_s'])}"
            ),
            f"N = {count}: latency p50 / p90 (s)": lambda r, k=key: (
                f"{seconds(r['clients'][k]['p50_latency_s'])} / {seconds(r['clients'][k]['p90_latency_s'])}"
            ),
            f"N = {count}: errors, answers correct": lambda r, k=key: (
                f"{r['clients'][k]['errors']}, "
                f"{r['clients'][k]['correct']}/{len(r['clients'][k]['requests'])}"
            ),
        }
    rows |= {
        "peak RSS": lambda r: f"{r['peak_rss_bytes'] / 1e9:.2f} GB",
        "answers correct, all (pass keys)": lambda r: f"{r['correct']}/{r['answers_total']}",
    }
    for text, cell in rows.items():
        out.add_row(text, *(cell(results[name]) for name in names))
    return out


def targets(results: dict[str, dict], names: list[str], args: argparse.Namespace) -> list[dict]:
    """The issue's targets, one entry per target and kvsqueeze column: what, measured, met."""
    largest = str(max(args.clients))
    base = results[TRANSFORMERS]
    base_run = base["clients"][largest]
    found = []

    def check(target: str, name: str, measured: str, met: bool) -> None:
        found.append({"target": target, "server": name, "measured": measured, "met": met})

    for name in names:
        pasted = results[name]["pasted"]["ratio_to_cold"]
        for kind in ("repeat", "other question"):
            check(
                f"{kind} TTFT <= {RATIO_TARGET}x cold",
                name,
                f"{pasted[kind]:.3f}x",
                pasted[kind] <= RATIO_TARGET,
            )
    for name in names[1:]:
        run = results[name]["clients"][largest]
        if name == "full":
            ratio = run["output_tokens_per_s"] / base_run["output_tokens_per_s"]
            check(
                f"N = {largest}: output tok/s >= {SPEEDUP_TARGET}x transformers'",
                name,
                f"{run['output_tokens_per_s']:.2f} vs {base_run['output_tokens_per_s']:.2f} ({ratio:.2f}x)",
                ratio >= SPEEDUP_TARGET,
            )
        peak, base_peak = results[name]["peak_rss_bytes"], base["peak_rss_bytes"]
        rss = peak / base_peak
        check(
            "peak RSS <= half of transformers'",
            name,
            f"{peak / 1e9:.2f} vs {base_peak / 1e9:.2f} GB ({rss:.2f}x)",
            rss <= HALF,
        )
        mine, theirs = run["p90_ttft_s"], base_run["p90_ttft_s"]
        check(
            f"N = {largest}: p90 TTFT <= half of transformers'",
            name,
            f"{seconds(mine)} vs {seconds(theirs)} s",
            mine is not None and theirs is not None and mine <= HALF * theirs,
        )
    for name in names:
        result = results[name]
        check(
            "every answer correct",
            name,
            f"{result['correct']}/{result['answers_total']}",
            result["correct"] == result["answers_total"],
        )
    return found


def target_table(found: list[dict]) -> Table:
    out = Table(title="targets (the issue's)")
    for column in ("target", "server", "measured", ""):
        out.add_column(column)
    for entry in found:
        out.add_row(entry["target"], entry["server"], entry["measured"], "met" if entry["met"] else "NOT MET")
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
    parser.add_argument(
        "--recipes",
        default="full,snapkv@0.75",
        help="kvsqueeze recipes, comma-separated, one server column each (default %(default)s; "
        "kvzip+global@0.75 works but is slow on CPU)",
    )
    parser.add_argument(
        "--clients", default="1,4,8", help="concurrent clients N, comma-separated (default %(default)s)"
    )
    parser.add_argument(
        "--prompt-tokens", type=int, default=500, help="each client request's length, roughly (default 500)"
    )
    parser.add_argument("--requests", type=int, default=3, help="requests per client, in turn (default 3)")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request (default 32)")
    parser.add_argument(
        "--first",
        choices=FIRST,
        default=TRANSFORMERS,
        help="run transformers before the kvsqueeze servers, or after them (default %(default)s)",
    )
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    parser.add_argument("--out", default=None, help="also write every measurement as JSON to this file")
    args = parser.parse_args()
    in_range(parser, args, "tokens", 100, 7000)
    in_range(parser, args, "documents", 1, 20)
    args.recipes = recipes(parser, args.recipes)
    args.clients = client_counts(parser, args.clients)
    in_range(parser, args, "prompt_tokens", 50, 4000)
    in_range(parser, args, "requests", 1, 50)
    in_range(parser, args, "max_tokens", 1, 512)
    in_range(parser, args, "threads", 1, os.cpu_count() or 1)
    needed = (
        max(args.clients) * (args.prompt_tokens + args.max_tokens + 64) * kv_bytes_per_token(model_files())
    )
    if needed > KV_MEMORY:
        parser.error(
            f"--clients x (--prompt-tokens + --max-tokens) do not fit the {KV_MEMORY >> 20} MiB KV budget"
        )
    if importlib.util.find_spec("accelerate") is None:
        parser.error("transformers serve needs accelerate (transformers[serving]): pip install accelerate")
    return args


def recipes(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """Canonical recipe strings, in order, without repeats."""
    names = []
    try:
        for part in split_recipes(text):
            name = str(Recipe.parse(part))
            if name not in names:
                names.append(name)
    except RecipeError as error:
        parser.error(f"--recipes: {error}")
    if not names:
        parser.error("--recipes needs at least one recipe, e.g. full")
    return names


def client_counts(parser: argparse.ArgumentParser, text: str) -> list[int]:
    """Sorted distinct N, each in 1..64."""
    counts = set()
    for part in text.split(","):
        try:
            count = int(part.strip())
        except ValueError:
            parser.error(f"--clients must be comma-separated integers, e.g. 1,4,8; not {text!r}")
        if not 1 <= count <= 64:
            parser.error(f"--clients: each N must be in 1..64, not {count}")
        counts.add(count)
    return sorted(counts)


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
    names = [TRANSFORMERS, *args.recipes]
    order = names if args.first == TRANSFORMERS else [*args.recipes, TRANSFORMERS]
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_start = load_average()
    results = {name: measure(name, model_dir, args) for name in order}
    load_end = load_average()
    payload = {
        "args": vars(args),
        "model_dir": str(model_dir),
        "order": order,
        "started": started,
        "load_average": {"start": load_start, "end": load_end},
        **results,
    }
    dump(args.out, payload)  # the measurements first, whatever the report below does
    payload["targets"] = report(payload, args)
    dump(args.out, payload)


def report(payload: dict, args: argparse.Namespace) -> list[dict]:
    """Prints the tables and notes of a run's ``payload``; returns its targets."""
    names = [TRANSFORMERS, *args.recipes]
    results = {name: payload[name] for name in names}
    found = targets(results, names, args)
    console = Console(width=150)
    console.print(table(results, names, args))
    console.print(target_table(found))
    model_dir = Path(payload["model_dir"])
    blocks = KV_MEMORY // (PAGE_TOKENS * kv_bytes_per_token(model_dir))
    print(f"model files: {model_dir}; KV budget {KV_MEMORY >> 20} MiB each")
    print(
        f"transformers' KV capped with --cb-num-blocks {blocks} ({PAGE_TOKENS}-token pages) to that budget; "
        "without the cap it sizes its cache from 90% of the free RAM"
    )
    print(f"order: {', '.join(payload['order'])} (one after the other, never together)")
    load = payload["load_average"]
    print(
        f"started {payload['started']}; load average (1, 5, 15 min) at start {tuple(load['start'])}, "
        f"at end {tuple(load['end'])}"
    )
    for name in payload["order"]:
        print(f"{name}: {results[name]['seconds']:.0f} s")
    return found


if __name__ == "__main__":
    main()
