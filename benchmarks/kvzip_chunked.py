"""KVzip's chunked reconstruction on long passkey prompts: peak KV bytes and prefill time next
to the full cache, measured side by side in one run.

For each prompt length, the full cache (chunked prefill, 256 tokens per forward, as
``kvsqueeze serve``) and ``kvzip+global@0.75`` with the default 2048-token pieces answer the
same passkey prompt; at 4k also one reconstruction forward for the whole copy (``chunk=8192``,
the pass before chunking). Peak = the most bytes the cache held at the end of any forward of the
request (``CompressedCache.nbytes``, fp32 as the model runs); "full" = what transformers' default
cache holds for the context and question (``nbytes_full``). A short prompt runs first: the first
forwards of a process are several times slower.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from kvsqueeze import CompressedCache, install, load_model
from kvsqueeze.engine import generate_multiturn
from kvsqueeze.eval.metrics import string_match_all
from kvsqueeze.eval.tasks import make_sample

RUNS = {
    4096: ("full", "kvzip+global@0.75", "kvzip:chunk=8192+global@0.75"),
    7168: ("full", "kvzip+global@0.75"),
}
CHUNK_SIZE = 256


def peak_tracker(model) -> tuple[list[int], object]:
    """A forward hook recording the most bytes any ``CompressedCache`` held after a forward."""
    peak = [0]

    def record(module, args, kwargs, output):
        cache = kwargs.get("past_key_values")
        if isinstance(cache, CompressedCache):
            peak[0] = max(peak[0], cache.nbytes())

    return peak, model.base_model.register_forward_hook(record, with_kwargs=True)


def main() -> None:
    model, tokenizer = load_model()
    install(model)
    warm_up = make_sample(tokenizer, "passkey", 512, 0)
    generate_multiturn(model, tokenizer, warm_up.context, [warm_up.questions[0]], chunk_size=CHUNK_SIZE)
    table = Table(title="KVzip chunked reconstruction, passkey prompt, fp32, query-agnostic")
    for column in ("prompt", "recipe", "peak MB", "full MB", "peak / full", "kept MB", "prefill s", "answer"):
        table.add_column(column, justify="right")
    for length, recipes in RUNS.items():
        sample = make_sample(tokenizer, "passkey", length, 0)
        prefix = sample.answer_prefix if isinstance(sample.answer_prefix, str) else sample.answer_prefix[0]
        for recipe in recipes:
            peak, hook = peak_tracker(model)
            try:
                result = generate_multiturn(
                    model,
                    tokenizer,
                    sample.context,
                    [sample.questions[0]],
                    recipe,
                    chunk_size=CHUNK_SIZE,
                    max_new_tokens=sample.max_new_tokens,
                    answer_prefix=prefix,
                )[0]
            finally:
                hook.remove()
            correct = string_match_all(result.answer, sample.answers[0]) == 1.0
            table.add_row(
                f"{sample.prompt_tokens} ({result.context_tokens} context)",
                recipe,
                f"{peak[0] / 1e6:.1f}",
                f"{result.kv_bytes_full / 1e6:.1f}",
                f"{peak[0] / result.kv_bytes_full:.2f}",
                f"{result.kv_bytes / 1e6:.1f}",
                f"{result.prefill_seconds:.1f}",
                f"{result.answer.strip()!r} ({'right' if correct else 'wrong'}, key {sample.answers[0][0]})",
            )
            Console(width=160).print(table)


if __name__ == "__main__":
    main()
