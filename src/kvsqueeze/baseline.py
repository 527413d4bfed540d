"""What transformers' default cache holds: the baseline a ``full`` recipe is compared against.

``DynamicCache(config=config)`` keeps every token on a full-attention layer but only the last
``sliding_window - 1`` tokens on a sliding one (``DynamicSlidingWindowLayer``), so on a hybrid
model such as Gemma 3 it holds far less than "every token on every layer".
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from kvsqueeze.compat import head_dim


def layer_windows(config: PretrainedConfig) -> list[int | None]:
    """The sliding window of each decoder layer as ``DynamicCache(config=config)`` builds it.

    Parameters
    ----------
    config : the model's config (a multimodal one is reduced to its text decoder, as transformers does).

    Returns
    -------
    Per layer, the window of a sliding (or chunked) layer, which attends to at most that many
    tokens, or None for a full-attention layer.

    Raises
    ------
    NotImplementedError
        For a layer that is neither (linear-attention state, KV shared with another layer).
    """
    # the cache itself decides (layer_types, or sliding_window / use_sliding_window / chunking when
    # a config has no layer_types); building one allocates no tensors
    windows = []
    for index, layer in enumerate(DynamicCache(config=config).layers):
        if isinstance(layer, DynamicSlidingWindowLayer):
            windows.append(layer.sliding_window)
        elif type(layer) is DynamicLayer:
            windows.append(None)
        else:
            raise NotImplementedError(f"layer {index} is a {type(layer).__name__}, not a KV-cache layer")
    return windows


def transformers_cache_bytes(
    config: PretrainedConfig, tokens_seen: int, batch: int = 1, dtype: torch.dtype | None = None
) -> int:
    """Bytes of keys and values that ``DynamicCache(config=config)`` holds after ``tokens_seen`` tokens.

    Parameters
    ----------
    config : the model's config.
    tokens_seen : tokens fed per batch row, left padding included (the cache stores it too).
    batch : batch rows.
    dtype : dtype of the stored keys and values; None takes the config's, or float32 if it has
        none. Pass the model's dtype if it was cast after loading (the config does not follow).

    Returns
    -------
    The bytes held: a full layer holds ``tokens_seen`` tokens, a sliding one
    ``min(tokens_seen, sliding_window - 1)``, each ``num_key_value_heads`` heads of ``head_dim``
    for keys and as many for values.
    """
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    text_config = config.get_text_config(decoder=True)
    total = 0
    for layer_config, window in zip(text_config.per_layer_config, layer_windows(config), strict=True):
        held = tokens_seen if window is None else min(tokens_seen, window - 1)
        total += batch * layer_config.num_key_value_heads * held * 2 * head_dim(layer_config) * dtype.itemsize
    return total
