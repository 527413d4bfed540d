"""Decode ms/token after a chunked prefill of 1k-8k tokens: transformers' DynamicCache vs kvsqueeze.

Every cache goes through the same loop. The context is English prose (``kvsqueeze.eval.text``,
the eval harness's filler) cut to exactly N tokens, prefilled in chunks of ``--chunk-size``:
kvsqueeze recipes through ``prefill_context`` (which compresses as the recipe says), transformers'
``DynamicCache`` through the same chunked forward loop (``engine.prefill``) with the model's
attention set to "sdpa" (kvsqueeze's attention is installed only for the kvsqueeze caches). Then
``--warmup`` + ``--decode-steps`` greedy steps, one explicit ``model(input_ids, attention_mask,
position_ids, past_key_values)`` each, timed one by one; the warm-up steps are dropped.

Noise: each cache is prefilled once per length, then the repeats run round-robin (a deep copy of
the prefilled cache per run, the starting cache rotated each repeat), so every ratio compares
runs taken side by side. ms/step is the median (p10, p90) of every timed step of every repeat; a
ratio is the median over repeats of the per-repeat ratio of medians. A step feeds one token per
row: for batch 1, ms/step is ms/token.

Batch: ``--batch-lengths`` rows of different text and lengths, left-padded, mask passed; the
same caches and loop.

Targets (the project's decode issue), single sequences, at every length:
  - ``full`` <= 1.05x ``DynamicCache``;
  - every recipe that evicts (snapkv@0.75, snapkv+kivi4@0.75) <= 1.00x ``full``;
  - a recipe that only quantizes (kivi4) <= 1.10x ``full``;
  - at 8k (8192 tokens) ``snapkv@0.75`` <= 0.75x ``full``;
  - peak RSS during a chunked ``--rss-length`` prefill with snapkv@0.75, minus the RSS before it
    (model loaded), <= budget + one chunk: the bytes of the kept tokens plus ``--chunk-size``
    tokens of K/V, all layers, the model's dtype. Measured in a fresh subprocess per recipe
    (VmHWM reset through /proc/self/clear_refs after a short warm-up prefill). The batch shows
    the same ratio targets, reported apart.

Allocator: by default the RSS subprocess runs with glibc's mmap threshold fixed at 128 KiB
(``MALLOC_MMAP_THRESHOLD_``), so a freed large buffer goes back to the OS at once and the peak
counts what is live at the same time. With glibc's sliding threshold (``--rss-malloc default``)
freed buffers stay in the heap and the peak is bimodal: the same 1k-token ``full`` prefill
measured 53 or 112 MiB from one run to the next (fixed: 54-58 MiB).

Memory: all caches of one length stay alive for the round-robin (plus one copy while decoding):
at 8192 tokens about 1 GiB, for the default batch (8 rows padded to 4096) about 5 GiB.

Run from the repository root: ``PYTHONPATH=src python benchmarks/decode_scaling.py`` (the full
run: ~20 min on a quiet 2-core machine); quick check:
``... --lengths 256,512 --decode-steps 8 --repeats 2 --batch-lengths 64,128,192,256 --rss-length 1024``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import DynamicCache

from kvsqueeze import CompressedCache, Recipe, install, load_model, prefill_context
from kvsqueeze.engine import decode_step, prefill
from kvsqueeze.eval.tasks import parse_length
from kvsqueeze.eval.text import PROSE_SOURCE, prose_paragraphs
from kvsqueeze.models import kv_cache_spec, max_context_length
from kvsqueeze.prefill import left_pad, positions_from_mask
from kvsqueeze.recipe import split_recipes

DYNAMIC = "DynamicCache"
FULL = "full"
SNAPKV = "snapkv@0.75"
EIGHT_K = 8192
ROW_OFFSET = 1009  # batch row i starts this many tokens further into the prose: rows differ
MIB = 2**20
START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", file=sys.stderr, flush=True)


def prose_tokens(tokenizer) -> list[int]:
    return tokenizer.encode(" ".join(prose_paragraphs()), add_special_tokens=False)


def context_rows(tokens: list[int], lengths: list[int]) -> list[list[int]]:
    """Row ``i``: exactly ``lengths[i]`` prose tokens from ``i * ROW_OFFSET`` on (wrapping around)."""
    rows = []
    for i, length in enumerate(lengths):
        start = i * ROW_OFFSET % len(tokens)
        rows.append((tokens * math.ceil((start + length) / len(tokens)))[start : start + length])
    return rows


def use_attention(model, name: str) -> None:
    """Stock SDPA for DynamicCache; kvsqueeze's attention over the paged blocks (the CPU decode
    kernel when it is built) for the kvsqueeze caches."""
    if name == DYNAMIC:
        model.set_attn_implementation("sdpa")
    else:
        install(model)


def kv_bytes(cache) -> int:
    """Bytes of every tensor the cache holds (``nbytes``; for DynamicCache its keys and values)."""
    if isinstance(cache, CompressedCache):
        return cache.nbytes()
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def prefilled(model, tokenizer, name: str, ids: torch.Tensor, mask: torch.Tensor, chunk_size: int):
    """A fresh cache ``name`` holding the context: (cache, last logits, seconds)."""
    use_attention(model, name)
    start = time.perf_counter()
    if name == DYNAMIC:
        cache = DynamicCache(config=model.config)
        logits = prefill(model, cache, ids, mask, chunk_size)  # what prefill_context runs for `full`
    else:
        cache = CompressedCache(Recipe.parse(name))
        logits = prefill_context(model, tokenizer, cache, ids, mask, chunk_size)
    return cache, logits, time.perf_counter() - start


@torch.no_grad()
def timed_decode(
    model, cache, logits: torch.Tensor, mask: torch.Tensor, warmup: int, steps: int
) -> list[float]:
    """Milliseconds of each greedy decode step after the ``warmup`` first ones."""
    positions = positions_from_mask(mask)[:, -1:]
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        logits, mask, positions = decode_step(model, cache, logits.argmax(-1), mask, positions)
        times.append(1000 * (time.perf_counter() - start))
    return times[warmup:]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def measure(model, tokenizer, names: list[str], rows: list[list[int]], args, label: str) -> list[dict]:
    """Prefill every cache once, then decode round-robin ``args.repeats`` times."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = left_pad(rows, pad_id)
    held, records = {}, {}
    for name in names:
        cache, logits, seconds = prefilled(model, tokenizer, name, ids, mask, args.chunk_size)
        held[name] = (cache, logits)
        records[name] = {
            "context": label,
            "length": ids.shape[1],
            "batch": len(rows),
            "row_lengths": [len(row) for row in rows],
            "cache": name,
            "prefill_s": seconds,
            "kv_bytes": kv_bytes(cache),
            "step_ms": [],
        }
        log(f"{label}: {name} prefilled in {seconds:.1f} s, {records[name]['kv_bytes'] / MIB:.1f} MiB KV")
    for repeat in range(args.repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            cache, logits = held[name]
            use_attention(model, name)
            steps = timed_decode(model, copy.deepcopy(cache), logits, mask, args.warmup, args.decode_steps)
            records[name]["step_ms"].append(steps)
        medians = ", ".join(f"{n} {statistics.median(records[n]['step_ms'][-1]):.1f}" for n in names)
        log(f"{label}: repeat {repeat + 1}/{args.repeats}: ms/step {medians}")
    del held
    gc.collect()
    for record in records.values():
        pooled = [ms for steps in record["step_ms"] for ms in steps]
        record.update(
            repeats=args.repeats,
            decode_steps=args.decode_steps,
            warmup=args.warmup,
            median_ms=statistics.median(pooled),
            p10_ms=percentile(pooled, 0.1),
            p90_ms=percentile(pooled, 0.9),
            repeat_median_ms=[statistics.median(steps) for steps in record["step_ms"]],
        )
    for record in records.values():
        for key, reference in (("vs_dynamic", DYNAMIC), ("vs_full", FULL)):
            record[key] = None
            if reference in records and record["cache"] not in (reference, DYNAMIC):
                pairs = zip(record["repeat_median_ms"], records[reference]["repeat_median_ms"], strict=True)
                record[key] = statistics.median(mine / theirs for mine, theirs in pairs)
    return list(records.values())


def targets(record: dict) -> list[tuple[str, float, float]]:
    """(target, ratio, limit) of every target that applies to ``record``."""
    name = record["cache"]
    if name == FULL and record["vs_dynamic"] is not None:
        return [("full <= 1.05x DynamicCache", record["vs_dynamic"], 1.05)]
    if name in (DYNAMIC, FULL) or record["vs_full"] is None:
        return []
    limit = 1.0 if Recipe.parse(name).evicts else 1.10
    found = [(f"{name} <= {limit:.2f}x full", record["vs_full"], limit)]
    if name == SNAPKV and record["length"] == EIGHT_K and record["batch"] == 1:
        found.append((f"at 8k {SNAPKV} <= 0.75x full", record["vs_full"], 0.75))
    return found


def verdict(ok: bool) -> str:
    return "PASS" if ok else "[red]FAIL[/]"


def decode_table(records: list[dict], args) -> Table:
    title = (
        f"decode ms/step after a chunked prefill (chunk {args.chunk_size}), {args.decode_steps} steps "
        f"x {args.repeats} repeats after {args.warmup} warm-up, torch threads: {args.threads}"
    )
    table = Table(title=title)
    columns = ("context", "cache", "KV MiB", "prefill s", "median", "p10", "p90", "vs Dynamic", "vs full")
    for column in (*columns, "target"):
        table.add_column(column, justify="left" if column in ("context", "cache", "target") else "right")
    previous = None
    for record in records:
        if previous is not None and record["context"] != previous:
            table.add_section()
        previous = record["context"]
        ratio = [
            f"{record[key]:.3f}" if record[key] is not None else "–" for key in ("vs_dynamic", "vs_full")
        ]
        checks = "; ".join(f"{text}: {verdict(r <= limit)}" for text, r, limit in targets(record))
        table.add_row(
            record["context"],
            record["cache"],
            f"{record['kv_bytes'] / MIB:.1f}",
            f"{record['prefill_s']:.1f}",
            f"{record['median_ms']:.2f}",
            f"{record['p10_ms']:.2f}",
            f"{record['p90_ms']:.2f}",
            *ratio,
            checks or "–",
        )
    return table


def target_summary(records: list[dict], rss: list[dict]) -> tuple[Table, list[dict]]:
    """Each target over every single-sequence length (worst ratio), and the batch apart."""
    found: dict[str, dict] = {}
    for record in records:
        for text, ratio, limit in targets(record):
            entry = found.setdefault(text, {"target": text, "limit": limit, "lengths": {}, "batch": None})
            if record["batch"] == 1:
                entry["lengths"][record["length"]] = ratio
            else:
                entry["batch"] = ratio
    table = Table(title="targets")
    for column in ("target", "ratio per length", "worst", "result", "batch", "batch result"):
        table.add_column(column, justify="left" if column in ("target", "ratio per length") else "right")
    summary = []
    for entry in found.values():
        limit, per_length, batch = entry["limit"], entry["lengths"], entry["batch"]
        worst = max(per_length.values()) if per_length else None
        entry.update(worst=worst, passed=None if worst is None else worst <= limit)
        entry["batch_passed"] = None if batch is None else batch <= limit
        table.add_row(
            entry["target"],
            ", ".join(f"{length}: {ratio:.3f}" for length, ratio in per_length.items()) or "–",
            "–" if worst is None else f"{worst:.3f}",
            "not measured" if worst is None else verdict(entry["passed"]),
            "–" if batch is None else f"{batch:.3f}",
            "–" if batch is None else verdict(entry["batch_passed"]),
        )
        summary.append({**entry, "lengths": {str(k): v for k, v in per_length.items()}})
    eight_k = f"at 8k {SNAPKV} <= 0.75x full"
    if eight_k not in found:
        table.add_row(eight_k, "–", "–", "not measured (needs 8192 in --lengths)", "–", "–")
    for result in rss:
        if result["cache"] == SNAPKV:
            text = f"peak RSS - baseline, {result['tokens']}-token prefill with {SNAPKV} <= budget + chunk"
            passed = result["measured_bytes"] <= result["bound_bytes"]
            ratio = result["measured_bytes"] / result["bound_bytes"]
            table.add_row(text, f"measured / bound {ratio:.2f}", f"{ratio:.3f}", verdict(passed), "–", "–")
            summary.append({"target": text, "limit": 1.0, "worst": ratio, "passed": passed})
    if not any(result["cache"] == SNAPKV for result in rss):
        text = f"peak RSS - baseline, prefill with {SNAPKV} <= budget + chunk"
        table.add_row(text, "–", "–", "not measured (needs it in --rss-recipes)", "–", "–")
    return table, summary


def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise SystemExit(f"/proc/self/status has no {field}: the RSS measurement needs Linux")


def rss_worker(args) -> None:
    """In a fresh process: load, warm up, reset the peak, prefill, print one JSON line."""
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    rows = context_rows(prose_tokens(tokenizer), [args.rss_length])
    ids, mask = left_pad(rows, tokenizer.eos_token_id)
    warm = min(args.chunk_size, 64)  # lazily created runtime state (threads, kernels) goes in the baseline
    prefilled(model, tokenizer, args.rss_worker, ids[:, : 2 * warm], mask[:, : 2 * warm], warm)
    gc.collect()
    baseline = vm_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    after_reset = vm_kib("VmHWM")
    cache, _, seconds = prefilled(model, tokenizer, args.rss_worker, ids, mask, args.chunk_size)
    peak = vm_kib("VmHWM")
    result = {"baseline_kib": baseline, "hwm_after_reset_kib": after_reset, "peak_kib": peak}
    print(json.dumps({**result, "kv_bytes": kv_bytes(cache), "prefill_s": seconds}))


def measure_rss(name: str, model, args) -> dict:
    """Run ``rss_worker`` in a subprocess; add the computed bound (budget + one chunk)."""
    log(f"RSS: {name}, {args.rss_length}-token prefill (chunk {args.chunk_size}) in a subprocess")
    command = [sys.executable, str(Path(__file__).resolve()), "--rss-worker", name]
    command += ["--rss-length", str(args.rss_length), "--chunk-size", str(args.chunk_size)]
    command += ["--threads", str(args.threads)]
    env = dict(os.environ)
    if args.rss_malloc == "fixed":
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        raise SystemExit(f"the RSS subprocess for {name} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    layers, kv_heads, head_dim = kv_cache_spec(model.config)
    per_token = layers * kv_heads * 2 * head_dim * model.dtype.itemsize
    recipe = None if name == DYNAMIC else Recipe.parse(name)
    tokens = args.rss_length
    kept = math.ceil((1 - recipe.ratio) * tokens) if recipe is not None and recipe.evicts else tokens
    result.update(
        cache=name,
        tokens=tokens,
        malloc=args.rss_malloc,
        chunk_size=args.chunk_size,
        kept_tokens=kept,
        budget_bytes=kept * per_token,
        chunk_bytes=args.chunk_size * per_token,
        bound_bytes=(kept + args.chunk_size) * per_token,
        measured_bytes=(result["peak_kib"] - result["baseline_kib"]) * 1024,
    )
    log(f"RSS: {name}: peak - baseline {result['measured_bytes'] / MIB:.1f} MiB")
    return result


def rss_table(results: list[dict]) -> Table:
    malloc = ", ".join(sorted({r["malloc"] for r in results}))
    title = (
        f"peak RSS during a chunked prefill, each in a fresh process (model loaded first), malloc: {malloc}"
    )
    table = Table(title=title)
    columns = ("cache", "tokens", "baseline MiB", "peak MiB", "peak - baseline", "KV after", "budget")
    for column in (*columns, "+ chunk = bound", "measured / bound", "target"):
        table.add_column(column, justify="left" if column == "cache" else "right")
    for r in results:
        ratio = r["measured_bytes"] / r["bound_bytes"]
        target = verdict(ratio <= 1.0) if r["cache"] == SNAPKV else "– (reference)"
        table.add_row(
            r["cache"],
            str(r["tokens"]),
            f"{r['baseline_kib'] / 1024:.1f}",
            f"{r['peak_kib'] / 1024:.1f}",
            f"{r['measured_bytes'] / MIB:.1f}",
            f"{r['kv_bytes'] / MIB:.1f}",
            f"{r['budget_bytes'] / MIB:.1f}",
            f"{r['bound_bytes'] / MIB:.1f}",
            f"{ratio:.2f}",
            target,
        )
    return table


def names_of(text: str) -> list[str]:
    """Canonical recipe strings (``DynamicCache`` kept as is); ``none`` or empty -> []."""
    if text.strip().lower() in ("", "none"):
        return []
    return [part if part == DYNAMIC else str(Recipe.parse(part)) for part in split_recipes(text)]


def lengths_of(text: str) -> list[int]:
    if text.strip().lower() in ("", "none"):
        return []
    return [parse_length(part) for part in text.split(",") if part.strip()]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--lengths", default="1k,2k,4k,8k", help="context lengths in tokens (default 1k,2k,4k,8k; 1k = 1024)"
    )
    parser.add_argument(
        "--recipes",
        default="full,snapkv@0.75,kivi4,snapkv+kivi4@0.75",
        help="kvsqueeze recipes to time next to DynamicCache (always run); `full` is the reference "
        "of the compressed ones (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-lengths",
        default="512,1024,1536,2048,2560,3072,3584,4096",
        help="one batch, one row per length (left-padded, mask passed); `none` skips it "
        "(default: %(default)s; the 8k batch: 1k,2k,3k,4k,5k,6k,7k,8k)",
    )
    parser.add_argument("--chunk-size", type=int, default=512, help="prefill chunk in tokens (default 512)")
    parser.add_argument(
        "--decode-steps", type=int, default=64, help="timed decode steps per run (default 64)"
    )
    parser.add_argument("--warmup", type=int, default=4, help="untimed decode steps before them (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="round-robin repeats per length (default 3)")
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch.set_num_threads (default: all cores this process may use, %(default)s); on a CPU "
        "shared with other work, 1: two OpenMP threads then stall on every small op",
    )
    parser.add_argument(
        "--rss-length", type=parse_length, default=EIGHT_K, help="tokens of the RSS prefill (default 8k)"
    )
    parser.add_argument(
        "--rss-recipes",
        default=f"{SNAPKV},full",
        help="caches whose peak RSS is measured, one subprocess each; the target is on snapkv@0.75, "
        "the others are references; `none` skips (default: %(default)s)",
    )
    parser.add_argument(
        "--rss-malloc",
        choices=("fixed", "default"),
        default="fixed",
        help="glibc allocator of the RSS subprocess: mmap threshold fixed at 128 KiB (default) or "
        "glibc's own sliding threshold (see above)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every measurement to this JSON file")
    parser.add_argument("--rss-worker", help=argparse.SUPPRESS)  # internal: the RSS subprocess
    args = parser.parse_args()
    if min(args.chunk_size, args.decode_steps, args.repeats, args.threads) < 1 or args.warmup < 0:
        parser.error("--chunk-size, --decode-steps, --repeats and --threads must be >= 1, --warmup >= 0")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_worker:
        rss_worker(args)
        return
    names = [DYNAMIC, *(name for name in names_of(args.recipes) if name != DYNAMIC)]
    lengths, batch_lengths = lengths_of(args.lengths), lengths_of(args.batch_lengths)
    model, tokenizer = load_model()
    tokens = prose_tokens(tokenizer)
    log(f"{len(tokens)} tokens of prose ({PROSE_SOURCE}); torch threads: {args.threads}")
    if lengths or batch_lengths:
        log(f"decode: caches {', '.join(names)}; lengths {lengths}; batch {batch_lengths or 'none'}")
    limit = max_context_length(model, tokenizer)
    longest = max([*lengths, *batch_lengths, 0]) + args.warmup + args.decode_steps
    if longest > limit:
        log(f"note: decoding runs to position {longest}, past the model's {limit} (timing is unaffected)")
    records = []
    for length in lengths:
        records += measure(model, tokenizer, names, context_rows(tokens, [length]), args, str(length))
    if batch_lengths:
        label = f"batch {len(batch_lengths)}: {min(batch_lengths)}-{max(batch_lengths)}"
        records += measure(model, tokenizer, names, context_rows(tokens, batch_lengths), args, label)
    rss = [measure_rss(name, model, args) for name in names_of(args.rss_recipes)]
    console = Console(width=200)
    if records:
        console.print(decode_table(records, args))
    if rss:
        console.print(rss_table(rss))
    summary_table, summary = target_summary(records, rss)
    console.print(summary_table)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "rss_worker")}
        settings.update(
            lengths=lengths,
            caches=names,
            batch_lengths=batch_lengths,
            rss_recipes=names_of(args.rss_recipes),
            model_dtype=str(model.dtype).removeprefix("torch."),
            text=PROSE_SOURCE,
        )
        payload = {
            "settings": settings,
            "torch": torch.__version__,
            "decode": records,
            "rss": rss,
            "targets": summary,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
