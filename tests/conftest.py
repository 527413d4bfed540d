"""Shared pytest fixtures."""

from __future__ import annotations

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvsqueeze.models import load_model


@pytest.fixture(scope="session")
def real_model() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The embedded SmolLM2-135M (float32, CPU), loaded once per session; converts it on first use."""
    return load_model(device="cpu")
