"""Tiny random-weight models of every architecture kvsqueeze is tested on (and tiny fitted files)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

# Windows are shorter than the test prompts, so sliding-window masking and eviction are exercised.
# head_dim differs from hidden_size / heads where the released models do the same, and Gemma's
# scaling comes from query_pre_attn_scalar, not head_dim; a cache that assumes either is caught.
ARCHITECTURES = {
    "llama": (LlamaConfig, {}),
    "qwen2": (Qwen2Config, {}),
    "mistral": (MistralConfig, {"sliding_window": 12}),
    "qwen3": (Qwen3Config, {"head_dim": 32}),
    "gemma2": (
        Gemma2Config,
        # weights and a cap large / low enough that attention logits reach the cap's curved range,
        # so ignoring softcapping (or applying it after the mask) changes the logits
        {
            "head_dim": 32,
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 5.0,
            "initializer_range": 0.1,
            "sliding_window": 8,
        },
    ),
    "gemma3": (
        Gemma3TextConfig,
        {
            "num_hidden_layers": 4,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            "head_dim": 32,
            "query_pre_attn_scalar": 24,
            "sliding_window": 8,
        },
    ),
    # Phi-3-mini-4k slides every layer (window 2047); its default pad id is outside a tiny vocabulary
    "phi3": (Phi3Config, {"sliding_window": 10, "pad_token_id": 0, "eos_token_id": 2}),
}


def tiny_model(arch: str = "llama", seed: int = 0, layers: int | None = None, **overrides) -> torch.nn.Module:
    """2 KV heads shared by 4 query heads, hidden size 64; ``overrides`` change any config field.

    ``layers`` defaults to 2, or to the architecture's own count (Gemma 3: 4, so that a full layer
    sits between sliding ones); with Gemma 3, pass matching ``layer_types`` too. Attention is the
    architecture's default: SDPA, or eager for Gemma 2 (SDPA has no softcapping).
    """
    config_cls, extra = ARCHITECTURES[arch]
    fields = {
        "vocab_size": 96,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        **extra,
        **({} if layers is None else {"num_hidden_layers": layers}),
        **overrides,
    }
    config = config_cls(**fields)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


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


def random_kvzap_weights(directory: Path, layers: int = 2, heads: int = 2, dim: int = 8) -> str:
    """Path of a seeded random ``kvzap`` weights file for ``layers x heads`` KV heads of ``dim``."""
    from kvsqueeze.scorers.predictor import ScorePredictor

    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(layers, heads, dim // 2 + dim, generator=generator).tolist()
    predictor = ScorePredictor("random", weights, torch.randn(layers, heads, generator=generator).tolist())
    return str(predictor.save(Path(directory) / "kvzap-random.json"))
