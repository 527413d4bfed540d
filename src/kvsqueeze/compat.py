"""Every detail that depends on the transformers version lives here."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_inverse_frequencies(config: PretrainedConfig, layer_type: str | None = None) -> torch.Tensor | None:
    """RoPE inverse frequencies ``[rotary_dim // 2]`` as the model computes them, or None without RoPE.

    ``layer_type`` (an entry of ``config.layer_types``) picks the parameters of that kind of layer
    when the config keys them by layer type (Gemma 3: ``rope_parameters["sliding_attention"]``
    and ``["full_attention"]`` have different thetas); other configs have one set for all.
    """
    params = getattr(config, "rope_parameters", None)
    if params and layer_type in params:
        params = params[layer_type]
    else:
        layer_type = None
    if not params or "rope_theta" not in params:
        return None
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, layer_type=layer_type)
        return inv_freq.float()
    rotary_dim = int(head_dim(config) * params.get("partial_rotary_factor", 1.0))
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim
    return 1.0 / (params["rope_theta"] ** exponents)
