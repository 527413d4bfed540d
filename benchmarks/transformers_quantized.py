"""kvsqueeze's quantizers next to transformers' own ``QuantizedCache`` on the same samples.

Every cache answers the same default-suite prompts (passkey, niah_multikey, multiturn at 1k tokens,
seed 0: the eval harness's samples), query-agnostic: the context is prefilled once, each question
is asked against a copy. kvsqueeze recipes run through ``generate_multiturn`` (what ``kvsqueeze
eval`` runs); transformers' caches (quanto / HQQ backends at 2 and 4 bits with their defaults,
group 64 and a 128-token residual, plus fp8) through the same prefill and greedy decode. Bytes are
measured after the question's prefill: every tensor a cache holds (codes, scales, zero points,
residual), reported against a 16-bit full cache of the same tokens. ``full`` runs both ways as a
check that the two paths feed the model identically.

Needs ``pip install optimum-quanto hqq`` (``make bench-transformers`` installs them); a missing
backend is reported and skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections import defaultdict
from functools import partial
from statistics import mean

import torch
from rich.console import Console
from rich.table import Table
from transformers import DynamicCache, QuantizedCache

from kvsqueeze import install, load_model
from kvsqueeze.engine import decode, eos_ids, generate_multiturn, prefill, split_prompt
from kvsqueeze.eval.metrics import string_match_all
from kvsqueeze.eval.tasks import make_sample, resolve_tasks
from kvsqueeze.models import kv_cache_spec

KVSQUEEZE = ("full", "kivi2", "kivi4", "gear", "kivi2:group_size=16", "keydiff+mixed@0.75")
TRANSFORMERS = {
    "DynamicCache (full)": ("dynamic", {}),
    "quanto 4-bit": ("quanto", {"nbits": 4}),
    "quanto 2-bit": ("quanto", {"nbits": 2}),
    "HQQ 4-bit": ("hqq", {"nbits": 4}),
    "HQQ 2-bit": ("hqq", {"nbits": 2}),
    "fp8": ("fp8", {}),
}
PACKAGES = {"quanto": "optimum.quanto", "hqq": "hqq"}


def held_bytes(obj, seen: set[int] | None = None) -> int:
    """Bytes of every distinct tensor reachable from ``obj`` (tensor subclasses flattened), 32-bit
    floats counted at 16 bits: what a 16-bit model holds (``CompressedCache.nbytes(torch.float16)``)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(held_bytes(getattr(obj, name), seen) for name in names)
        return obj.numel() * (2 if obj.dtype == torch.float32 else obj.element_size())
    if isinstance(obj, dict):
        return sum(held_bytes(value, seen) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(held_bytes(item, seen) for item in obj)
    return 0


def transformers_cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        parts = [layer.keys, layer.values]
        parts += [getattr(layer, name, None) for name in ("_quantized_keys", "_quantized_values")]
        total += held_bytes([part for part in parts if part is not None])
    return total


def make_cache(backend: str, options: dict, config):
    return DynamicCache(config=config) if backend == "dynamic" else QuantizedCache(backend, config, **options)


def answer_with_transformers_cache(model, tokenizer, sample, backend: str, options: dict) -> list[tuple]:
    """The query-agnostic path of ``generate_multiturn`` with a transformers cache (context, then
    each question on its own copy of the context's cache): ``(answer, bytes, 16-bit full bytes)``."""
    eos = eos_ids(model, tokenizer)
    layers, kv_heads, head_dim = kv_cache_spec(model.config)
    prefixes = sample.answer_prefix
    prefixes = [prefixes] * len(sample.questions) if isinstance(prefixes, str) else list(prefixes)
    head, _ = split_prompt(tokenizer, sample.context, sample.questions[0])
    context = torch.tensor([tokenizer.encode(head, add_special_tokens=False)])
    out = []
    for question, prefix in zip(sample.questions, prefixes, strict=True):
        _, tail = split_prompt(tokenizer, sample.context, question, prefix)
        ids = torch.tensor([tokenizer.encode(tail, add_special_tokens=False)])
        # quanto's tensors cannot be deep-copied: the context is prefilled again for each question
        cache = make_cache(backend, options, model.config)
        prefill(model, cache, context, torch.ones_like(context))
        mask = torch.ones((1, cache.get_seq_length() + ids.shape[1]), dtype=torch.long)
        logits = prefill(model, cache, ids, mask)
        held = transformers_cache_bytes(cache)
        tokens = decode(model, cache, logits, mask, eos, sample.max_new_tokens)[0]
        text = tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True).strip()
        out.append((text, held, layers * kv_heads * mask.shape[1] * 2 * head_dim * 2))
    return out


def answer_with_kvsqueeze(model, tokenizer, sample, recipe: str) -> list[tuple]:
    """``generate_multiturn`` (what ``kvsqueeze eval`` runs): ``(answer, bytes, 16-bit full bytes)``."""
    prefix = sample.answer_prefix if isinstance(sample.answer_prefix, str) else list(sample.answer_prefix)
    results = generate_multiturn(
        model,
        tokenizer,
        sample.context,
        list(sample.questions),
        recipe,
        max_new_tokens=sample.max_new_tokens,
        answer_prefix=prefix,
    )
    return [(r.answer, r.kv_bytes_16bit, r.kv_bytes_full_16bit) for r in results]


def score_cache(samples, answer) -> tuple[float, float, dict]:
    """Mean over tasks of each sample's mean answer score (as ``kvsqueeze eval`` reports), the
    reduction against a 16-bit full cache over every answer, and the answers by sample."""
    per_task, held, full16, answers = defaultdict(list), 0, 0, {}
    for sample in samples:
        results = answer(sample)
        pairs = zip(results, sample.answers, strict=True)
        scores = [string_match_all(text, expected) for (text, _, _), expected in pairs]
        per_task[sample.task].append(sum(scores) / len(scores))
        held += sum(bytes_held for _, bytes_held, _ in results)
        full16 += sum(full for _, _, full in results)
        answers[(sample.task, sample.index)] = [text for text, _, _ in results]
    return 100 * mean(mean(v) for v in per_task.values()), full16 / held, answers


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=3, help="samples per task (default 3)")
    parser.add_argument("--tasks", default="default", help="tasks or suite (default: default)")
    args = parser.parse_args()
    model, tokenizer = load_model()
    install(model)
    tasks = resolve_tasks(args.tasks)
    samples = [make_sample(tokenizer, task, 1024, i) for task in tasks for i in range(args.samples)]
    start = time.perf_counter()
    rows = []
    for recipe in KVSQUEEZE:
        score, reduction, answers = score_cache(
            samples, partial(answer_with_kvsqueeze, model, tokenizer, recipe=recipe)
        )
        rows.append((f"kvsqueeze `{recipe}`", score, reduction))
        if recipe == "full":
            full_answers = answers
    for label, (backend, options) in TRANSFORMERS.items():
        if backend in PACKAGES and importlib.util.find_spec(PACKAGES[backend]) is None:
            rows.append((f"transformers {label} (not installed)", None, None))
            continue
        answer = partial(answer_with_transformers_cache, model, tokenizer, backend=backend, options=options)
        score, reduction, answers = score_cache(samples, answer)
        rows.append((f"transformers {label}", score, reduction))
        if backend == "dynamic" and answers != full_answers:
            print("warning: DynamicCache and kvsqueeze `full` answered differently: the paths differ")
    full_score = rows[0][1]
    title = f"same {len(samples)} prompts ({', '.join(tasks)}; 1k tokens, seed 0), query-agnostic"
    table = Table(title=title)
    for column in ("cache", "mean score over tasks", "vs full", "x vs 16-bit full"):
        table.add_column(column, justify="right")
    for label, score, reduction in rows:
        if score is None:
            table.add_row(label, "–", "–", "–")
            continue
        table.add_row(label, f"{score:.1f}", f"{score / full_score:.2f}", f"{reduction:.2f}x")
    Console(width=120).print(table)
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
