"""Tiny random-weight Llama / Qwen2 / Mistral models for fast tests."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

ARCHITECTURES = {
    "llama": (LlamaConfig, {}),
    "qwen2": (Qwen2Config, {}),
    # a window shorter than the test prompts, so sliding-window masking is exercised
    "mistral": (MistralConfig, {"sliding_window": 12}),
}


def tiny_model(arch: str = "llama", seed: int = 0, layers: int = 2, **overrides) -> torch.nn.Module:
    """2 KV heads shared by 4 query heads, hidden size 64; ``overrides`` change any config field."""
    config_cls, extra = ARCHITECTURES[arch]
    fields = {
        "vocab_size": 96,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        **extra,
        **overrides,
    }
    config = config_cls(**fields)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


def padded_batch(lengths: list[int], vocab: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids ``[B, max(lengths)]`` left-padded to the longest row, and their mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=generator)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, width - length :] = 1
        ids[row, : width - length] = 0
    return ids, mask
