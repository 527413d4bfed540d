"""Shared pytest fixtures."""

from __future__ import annotations

import pytest
from tiny_models import tiny_model
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kvsqueeze.models import converted_checkpoint_dir, load_model


@pytest.fixture(scope="session")
def real_model() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The embedded SmolLM2-135M (float32, CPU), loaded once per session; converts it on first use."""
    return load_model(device="cpu")


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerBase:
    """The embedded model's tokenizer alone (converts the model once if nothing did yet)."""
    if not (converted_checkpoint_dir() / "tokenizer.json").exists():
        load_model(device="cpu")
    return AutoTokenizer.from_pretrained(converted_checkpoint_dir())


@pytest.fixture(scope="session")
def tiny(tokenizer) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A 2-layer random Llama whose vocabulary is the real tokenizer's."""
    model = tiny_model(
        "llama", vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=True
    )
    return model, tokenizer
