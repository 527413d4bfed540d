"""transformers_cache_bytes against what a real DynamicCache holds, on every tiny architecture."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHITECTURES, padded_batch, tiny_model
from transformers import DynamicCache, LlamaConfig, Qwen2Config, Qwen3NextConfig

from kvsqueeze.baseline import layer_windows, transformers_cache_bytes


def held_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_bytes_are_what_dynamic_cache_holds(arch, batch):
    model = tiny_model(arch)
    # 6 tokens then 3 decode steps crosses the smallest window (8, i.e. 7 held); 20 exceeds every window
    for prompt in (6, 20):
        ids, mask = padded_batch([prompt, prompt - 3][:batch])
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits
            assert held_bytes(cache) == transformers_cache_bytes(model.config, prompt, batch)
            for step in range(1, 4):
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
                token = logits[:, -1:].argmax(-1)
                logits = model(input_ids=token, attention_mask=mask, past_key_values=cache).logits
                assert held_bytes(cache) == transformers_cache_bytes(model.config, prompt + step, batch)


def test_sliding_layers_hold_less_than_every_token():
    config = tiny_model("gemma3").config
    # 3 sliding layers hold 7 tokens, the full one 20; 2 KV heads of 32 dims, keys and values, fp32
    assert transformers_cache_bytes(config, 20) == (3 * 7 + 20) * 2 * 32 * 2 * 4
    assert transformers_cache_bytes(config, 5) == 4 * 5 * 2 * 32 * 2 * 4


def test_dtype_override_and_config_dtype():
    config = tiny_model("qwen3").config
    assert config.dtype == torch.float32
    fp32 = transformers_cache_bytes(config, 30, 2)
    assert transformers_cache_bytes(config, 30, 2, dtype=torch.float16) * 2 == fp32
    half = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, dtype="bfloat16")
    assert transformers_cache_bytes(half, 30) == transformers_cache_bytes(half, 30, dtype=torch.float16)
    assert transformers_cache_bytes(half, 30) == transformers_cache_bytes(half, 30, dtype=torch.float32) // 2


@pytest.mark.parametrize(
    ("arch", "windows"),
    [
        ("llama", [None, None]),
        ("qwen2", [None, None]),
        ("mistral", [12, 12]),
        ("qwen3", [None, None]),
        ("gemma2", [8, None]),
        ("gemma3", [8, 8, None, 8]),
        ("phi3", [10, 10]),
    ],
)
def test_layer_windows_of_the_tiny_architectures(arch, windows):
    assert layer_windows(tiny_model(arch).config) == windows


def test_qwen2_slides_only_with_use_sliding_window_and_from_max_window_layers():
    assert layer_windows(Qwen2Config(num_hidden_layers=3, sliding_window=12)) == [None] * 3
    sliding = Qwen2Config(
        num_hidden_layers=3, sliding_window=12, use_sliding_window=True, max_window_layers=1
    )
    assert layer_windows(sliding) == [None, 12, 12]


def test_layers_without_a_kv_cache_are_refused():
    with pytest.raises(NotImplementedError, match="LinearAttentionLayer"):
        layer_windows(Qwen3NextConfig(num_hidden_layers=4))
