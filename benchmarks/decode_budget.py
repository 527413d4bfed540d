"""A bounded cache over a long answer: KV bytes, RSS and ms/token while 4,096 tokens are generated.

Three caches decode in lockstep, the same token fed to each at every step (the uncapped ``full``
cache's greedy choice, so every cache sees one sequence and only what it holds differs):
transformers' ``DynamicCache`` (stock SDPA), kvsqueeze ``full`` and the capped recipe (default
``decode:budget=256,every=32``). Steps are timed one by one, the three caches taking turns, so
machine noise hits them alike. Per 256-token segment: median ms/token of each cache; for the
kvsqueeze caches the largest ``nbytes()`` and tokens held per KV head.

Then, in a fresh subprocess, the capped cache alone generates the same number of tokens while
VmRSS is sampled every segment: a bounded cache keeps RSS flat (its growth after the first
segments is what the answer's length costs).

Targets (the decode-time compression issue): with ``budget=256,every=32`` every head holds at
most 288 tokens at every step, so KV bytes stay within the bytes of 288 tokens per head (plus the
slot of each token, the block tables and the recent decode queries, reported apart); RSS flat;
ms/token over the last segment <= 0.8x the uncapped ``full`` cache's.

Run from the repository root: ``PYTHONPATH=src python benchmarks/decode_budget.py`` (~15 min on
a quiet 2-core machine); quick check: ``... --tokens 512 --segment 128``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from decode_scaling import kv_bytes, log, use_attention, vm_kib
from rich.console import Console
from rich.table import Table
from transformers import DynamicCache

from kvsqueeze import CompressedCache, Recipe, load_model
from kvsqueeze.engine import decode_step
from kvsqueeze.models import chat_prompt, kv_cache_spec
from kvsqueeze.prefill import positions_from_mask

DYNAMIC = "DynamicCache"
FULL = "full"
PROMPT = "Write a very long story about a lighthouse keeper and the ships she saw, chapter by chapter."
MIB = 2**20


def prompt_ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.encode(chat_prompt(tokenizer, PROMPT), add_special_tokens=False)])


def new_cache(model, name: str):
    return DynamicCache(config=model.config) if name == DYNAMIC else CompressedCache(Recipe.parse(name))


def held_per_head(cache) -> int:
    """Most tokens any KV head holds (``CompressedCache``), or the sequence length (DynamicCache)."""
    if isinstance(cache, CompressedCache):
        return max(int(layer.held_lengths().max()) for layer in cache.layers)
    return cache.get_seq_length()


@torch.no_grad()
def lockstep(model, tokenizer, names: list[str], tokens: int, segment: int) -> list[dict]:
    """Prefill the prompt into every cache, then ``tokens`` decode steps in turns; per segment of
    ``segment`` steps: median ms/token, largest bytes and tokens held per head, for each cache."""
    ids = prompt_ids(tokenizer)
    mask = torch.ones_like(ids)
    caches, logits = {}, {}
    for name in names:
        use_attention(model, name)
        caches[name] = new_cache(model, name)
        out = model(input_ids=ids, attention_mask=mask, past_key_values=caches[name], use_cache=True)
        logits[name] = out.logits[:, -1]
    positions = positions_from_mask(mask)[:, -1:]
    segments, times, peaks, held = (
        [],
        {n: [] for n in names},
        dict.fromkeys(names, 0),
        dict.fromkeys(names, 0),
    )
    for step in range(1, tokens + 1):
        token = logits[FULL].argmax(-1)
        for name in names:
            use_attention(model, name)
            start = time.perf_counter()
            logits[name], next_mask, next_positions = decode_step(model, caches[name], token, mask, positions)
            times[name].append(1000 * (time.perf_counter() - start))
            peaks[name] = max(peaks[name], kv_bytes(caches[name]))
            held[name] = max(held[name], held_per_head(caches[name]))
        mask, positions = next_mask, next_positions
        if step % segment == 0:
            segments.append(
                {
                    "generated": step,
                    **{
                        name: {
                            "median_ms": statistics.median(times[name][-segment:]),
                            "kv_bytes_max": peaks[name],
                            "held_per_head_max": held[name],
                        }
                        for name in names
                    },
                }
            )
            peaks, held = dict.fromkeys(names, 0), dict.fromkeys(names, 0)
            ms = ", ".join(f"{n} {segments[-1][n]['median_ms']:.1f}" for n in names)
            log(f"{step}/{tokens} tokens: ms/token {ms}")
    return segments


def rss_worker(args) -> None:
    """In a fresh process: the capped cache alone generates ``--tokens``; VmRSS every segment."""
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    use_attention(model, args.recipe)
    cache = new_cache(model, args.recipe)
    ids = prompt_ids(tokenizer)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits[
            :, -1
        ]
        positions = positions_from_mask(mask)[:, -1:]
        samples = []
        for step in range(1, args.tokens + 1):
            logits, mask, positions = decode_step(model, cache, logits.argmax(-1), mask, positions)
            if step % args.segment == 0:
                samples.append({"generated": step, "rss_kib": vm_kib("VmRSS"), "kv_bytes": kv_bytes(cache)})
    print(json.dumps(samples))


def measure_rss(args) -> list[dict]:
    log(f"RSS: {args.recipe} alone, {args.tokens} tokens, in a subprocess")
    command = [sys.executable, str(Path(__file__).resolve()), "--rss-worker", "--recipe", args.recipe]
    command += ["--tokens", str(args.tokens), "--segment", str(args.segment), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"RSS worker failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def token_bytes(model, tokens: int) -> int:
    """Keys and values of ``tokens`` tokens in every KV head of every layer, the model's dtype."""
    layers, heads, dims = kv_cache_spec(model.config)
    return layers * heads * 2 * dims * tokens * model.dtype.itemsize


def report(segments: list[dict], rss: list[dict], names: list[str], args, model) -> dict:
    console = Console()
    table = Table(title=f"{args.tokens} generated tokens, ms/token per {args.segment}-token segment (median)")
    table.add_column("generated", justify="right")
    for name in names:
        table.add_column(f"{name} ms", justify="right")
    table.add_column(f"{args.recipe} / full", justify="right")
    table.add_column("held/head (capped)", justify="right")
    table.add_column("KV MiB full / capped", justify="right")
    for seg in segments:
        capped, full = seg[args.recipe], seg[FULL]
        table.add_row(
            str(seg["generated"]),
            *(f"{seg[n]['median_ms']:.1f}" for n in names),
            f"{capped['median_ms'] / full['median_ms']:.2f}",
            str(capped["held_per_head_max"]),
            f"{full['kv_bytes_max'] / MIB:.2f} / {capped['kv_bytes_max'] / MIB:.2f}",
        )
    console.print(table)
    component = Recipe.parse(args.recipe).decoding
    bound_tokens = component.budget + component.every
    held_max = max(seg[args.recipe]["held_per_head_max"] for seg in segments)
    bytes_max = max(seg[args.recipe]["kv_bytes_max"] for seg in segments)
    last = segments[-1]
    speed = last[args.recipe]["median_ms"] / last[FULL]["median_ms"]
    summary = {
        "held_per_head_max": held_max,
        "held_bound": bound_tokens,
        "kv_bytes_max": bytes_max,
        "kv_bytes_of_bound_tokens": token_bytes(model, bound_tokens),
        "last_segment_capped_vs_full": speed,
        "last_segment_full_vs_dynamic": last[FULL]["median_ms"] / last[DYNAMIC]["median_ms"],
    }
    console.print(
        f"held per head: at most {held_max} tokens (bound {bound_tokens}: "
        f"{'met' if held_max <= bound_tokens else 'NOT met'}); KV bytes at most {bytes_max / MIB:.2f} MiB = "
        f"{bytes_max / summary['kv_bytes_of_bound_tokens']:.3f}x the keys+values of {bound_tokens} tokens "
        "(the rest: each token's slot, block tables, recent decode queries)"
    )
    console.print(
        f"last segment: {args.recipe} {speed:.2f}x full "
        f"(target <= 0.80: {'met' if speed <= 0.8 else 'NOT met'}), "
        f"full {summary['last_segment_full_vs_dynamic']:.2f}x DynamicCache"
    )
    if rss:
        first, end = rss[min(1, len(rss) - 1)], rss[-1]
        growth = (end["rss_kib"] - first["rss_kib"]) / 1024
        console.print(
            f"RSS of {args.recipe} alone: {first['rss_kib'] / 1024:.1f} MiB "
            f"after {first['generated']} tokens, "
            f"{end['rss_kib'] / 1024:.1f} MiB after {end['generated']} ({growth:+.1f} MiB)"
        )
        summary["rss_growth_mib"] = growth
    return summary


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens generated (default 4096)")
    parser.add_argument("--segment", type=int, default=256, help="steps per reported segment (default 256)")
    parser.add_argument(
        "--recipe",
        default="decode:budget=256,every=32",
        help="the capped recipe (needs a decoding component)",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--no-rss", action="store_true", help="skip the RSS subprocess")
    parser.add_argument("--json", type=Path, help="write every measurement to this file")
    parser.add_argument("--rss-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tokens < args.segment or args.segment < 1:
        parser.error(f"--tokens ({args.tokens}) must be >= --segment ({args.segment}) >= 1")
    if Recipe.parse(args.recipe).decoding is None:
        parser.error(f"--recipe {args.recipe!r} has no decoding component (e.g. decode:budget=256,every=32)")
    return args


def main() -> None:
    args = parse_args()
    if args.rss_worker:
        rss_worker(args)
        return
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    names = [DYNAMIC, FULL, args.recipe]
    segments = lockstep(model, tokenizer, names, args.tokens, args.segment)
    rss = [] if args.no_rss else measure_rss(args)
    summary = report(segments, rss, names, args, model)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"json": str(args.json)},
                    "segments": segments,
                    "rss": rss,
                    "summary": summary,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
