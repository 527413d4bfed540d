"""End-to-end on the embedded SmolLM2-135M: passkey retrieval with and without compression."""

from __future__ import annotations

import pytest

from kvsqueeze.demo import contains_answer
from kvsqueeze.engine import generate

pytestmark = pytest.mark.real_model

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_context(key: int, depth: float, repeats: int = 30) -> str:
    """RULER's passkey layout: an instruction, repeated filler, the key stated twice at ``depth``."""
    parts = [FILLER] * repeats
    parts.insert(int(depth * repeats), f"The pass key is {key}. Remember it. {key} is the pass key. ")
    intro = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    return intro + "I will quiz you about the important information there.\n\n" + "".join(parts)


@pytest.mark.parametrize(("key", "depth"), [(30571, 0.5), (92734, 0.8)])
def test_passkey_full_cache_and_snapkv(real_model, key, depth):
    model, tokenizer = real_model
    context = passkey_context(key, depth)
    question = "What is the pass key?"
    full = generate(model, tokenizer, context, question, "full", max_new_tokens=12)
    snapkv = generate(model, tokenizer, context, question, "snapkv@0.75", query_aware=True, max_new_tokens=12)
    assert 750 <= full.context_tokens <= 850
    assert contains_answer(full.answer, str(key)), full.answer
    assert contains_answer(snapkv.answer, str(key)), snapkv.answer
    assert snapkv.mode == "query-aware" and full.mode == "query-agnostic"
    assert full.compression_ratio < 0.01
    assert 0.70 < snapkv.compression_ratio < 0.75  # the question is kept on top of 25% of the context
    assert snapkv.kv_bytes_full == full.kv_bytes_full


def test_chunked_prefill_keeps_the_answer_and_bounds_memory(real_model):
    model, tokenizer = real_model
    context = passkey_context(92734, 0.8)
    one_shot = generate(model, tokenizer, context, "What is the pass key?", "full", max_new_tokens=12)
    chunked = generate(
        model, tokenizer, context, "What is the pass key?", "full", chunk_size=256, max_new_tokens=12
    )
    assert chunked.answer == one_shot.answer


@pytest.mark.parametrize("recipe", ["kivi2", "kivi4"])
def test_passkey_with_kivi_quantization(real_model, recipe):
    model, tokenizer = real_model
    context = passkey_context(30571, 0.5)
    result = generate(model, tokenizer, context, "What is the pass key?", recipe, max_new_tokens=12)
    assert contains_answer(result.answer, "30571"), result.answer
    assert result.kv_bytes < result.kv_bytes_full / 4  # fp32 model; see the 16-bit ratio in benchmarks


@pytest.mark.parametrize("recipe", ["snapkv+adakv@0.75", "keydiff+mixed@0.75"])
def test_passkey_with_head_budgets_and_mixed_precision(real_model, recipe):
    model, tokenizer = real_model
    context = passkey_context(92734, 0.8)
    result = generate(
        model, tokenizer, context, "What is the pass key?", recipe, query_aware=True, max_new_tokens=12
    )
    assert contains_answer(result.answer, "92734"), result.answer
    assert result.kv_bytes_16bit < result.kv_bytes_full_16bit / 3


@pytest.mark.parametrize(
    ("recipe", "reduction"),
    [("kvzip+words@0.75", 3.5), ("kvzip+words+kivi4@0.85", 10), ("kvzip:chunk=128+global+words@0.75", 3.5)],
)
def test_passkey_query_agnostic_with_kvzip_reconstruction(real_model, recipe, reduction):
    """Compressed before the question is seen, by what the model needs to repeat the context."""
    model, tokenizer = real_model
    result = generate(
        model, tokenizer, passkey_context(92734, 0.8), "What is the pass key?", recipe, max_new_tokens=12
    )
    assert contains_answer(result.answer, "92734"), result.answer
    assert result.kv_bytes_16bit < result.kv_bytes_full_16bit / reduction


@pytest.mark.parametrize(("recipe", "reduction"), [("think+kivi4", 3.2), ("snapkv+think+kivi4@0.75", 7)])
def test_passkey_with_thinned_keys(real_model, recipe, reduction):
    """Half the key channels, chosen by ThinK's query-weighted norm, keep the pass key."""
    model, tokenizer = real_model
    result = generate(
        model,
        tokenizer,
        passkey_context(30571, 0.5),
        "What is the pass key?",
        recipe,
        query_aware=True,
        max_new_tokens=12,
    )
    assert contains_answer(result.answer, "30571"), result.answer
    assert result.kv_bytes_16bit < result.kv_bytes_full_16bit / reduction
