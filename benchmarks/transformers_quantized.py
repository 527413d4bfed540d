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

import torch
from rich.console import Console
from rich.table import Table
from transformers import DynamicCache, QuantizedCache

from kvsqueeze import install, load_model
from kvsqueeze.engine import decode, eos_ids, generate_multiturn, prefill, split_prompt
from kvsqueeze.eval.metrics import string_match_all
from kvsqueeze.eval.tasks import make_sample, resolve_tasks

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


def answer_with_transformers_cache(model, tokenizer, sample, backend: str, options: dict) -> list[dict]:
    """The query-agnostic path of ``generate_multiturn`` with a transformers cache (context, then
    each question on its own copy of the context's cache)."""
    eos = eos_ids(model, tokenizer)
    prefixes = sample.answer_prefix
    prefixes = [prefixes] * len(sample.questions) if isinstance(prefixes, str) else list(prefixes)
    head, _ = split_prompt(tokenizer, sample.context, sample.questions[0])
    context = torch.tensor([tokenizer.encode(head, add_special_tokens=False)])
    out = []
    for question, prefix in zip(sample.questions, prefixes, strict=True):
        _, tail = split_prompt(tokenizer, sample.context, question)
        ids = torch.tensor([tokenizer.encode(tail + prefix, add_special_tokens=False)])
        # quanto's tensors cannot be deep-copied: the context is prefilled again for each question
        cache = make_cache(backend, options, model.config)
        prefill(model, cache, context, torch.ones_like(context))
        mask = torch.ones((1, cache.get_seq_length() + ids.shape[1]), dtype=torch.long)
        logits = prefill(model, cache, ids, mask)
        held = transformers_cache_bytes(cache)
        tokens = decode(model, cache, logits, mask, eos, sample.max_new_tokens)[0]
        text = tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True).strip()
        out.append({"answer": text, "bytes": held, "tokens": mask.shape[1]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=3, help="samples per task (default 3)")
    parser.add_argument("--tasks", default="default", help="tasks or suite (default: default)")
    args = parser.parse_args()
    model, tokenizer = load_model()
    install(model)
    layers, kv_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    samples = [
        make_sample(tokenizer, task, 1024, i)
        for task in resolve_tasks(args.tasks)
        for i in range(args.samples)
    ]
    rows, answers = [], {}
    start = time.perf_counter()
    for recipe in KVSQUEEZE:
        scores, held, full16 = [], 0, 0
        for sample in samples:
            prefix = (
                sample.answer_prefix if isinstance(sample.answer_prefix, str) else list(sample.answer_prefix)
            )
            results = generate_multiturn(
                model,
                tokenizer,
                sample.context,
                list(sample.questions),
                recipe,
                max_new_tokens=sample.max_new_tokens,
                answer_prefix=prefix,
            )
            for result, expected in zip(results, sample.answers, strict=True):
                scores.append(string_match_all(result.answer, expected))
                held += result.kv_bytes_16bit
                full16 += result.kv_bytes_full_16bit
            answers[(recipe, sample.task, sample.index)] = [r.answer for r in results]
        rows.append((f"kvsqueeze `{recipe}`", scores, full16 / held))
    for label, (backend, options) in TRANSFORMERS.items():
        if backend in PACKAGES and importlib.util.find_spec(PACKAGES[backend]) is None:
            rows.append((f"transformers {label} (not installed)", None, None))
            continue
        scores, held, full16 = [], 0, 0
        for sample in samples:
            results = answer_with_transformers_cache(model, tokenizer, sample, backend, options)
            for result, expected in zip(results, sample.answers, strict=True):
                scores.append(string_match_all(result["answer"], expected))
                held += result["bytes"]
                full16 += layers * kv_heads * result["tokens"] * 2 * head_dim * 2
            if backend == "dynamic":
                same = answers[("full", sample.task, sample.index)] == [r["answer"] for r in results]
                if not same:
                    print(f"warning: DynamicCache and kvsqueeze full differ on {sample.task} #{sample.index}")
        rows.append((f"transformers {label}", scores, full16 / held))
    full_score = 100 * sum(rows[0][1]) / len(rows[0][1])
    table = Table(
        title=f"same {len(samples)} prompts ({args.tasks} suite, 1k tokens, seed 0), query-agnostic"
    )
    for column in ("cache", "score", "vs full", "x vs 16-bit full"):
        table.add_column(column, justify="right")
    for label, scores, reduction in rows:
        if scores is None:
            table.add_row(label, "–", "–", "–")
            continue
        score = 100 * sum(scores) / len(scores)
        table.add_row(label, f"{score:.1f}", f"{score / full_score:.2f}", f"{reduction:.2f}x")
    Console(width=120).print(table)
    print(f"{len(scores)} answers per cache; wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
