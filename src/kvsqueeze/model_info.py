"""What ``kvsqueeze models`` reports about each embedded model: shape, KV bytes, install state.

The shape comes from the converted checkpoint's config (an embedded model is converted on its
first load), so a model that is installed but not converted yet has no shape fields. KV bytes are
what transformers' own ``DynamicCache(config=...)`` holds (``kvsqueeze.baseline``) in float32,
the dtype ``load_model`` runs in: per token on every layer while a context is shorter than the
sliding window, and beyond it per token on the full-attention layers plus a fixed amount on the
sliding ones, which hold their window.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import AutoConfig

from kvsqueeze.baseline import layer_windows, transformers_cache_bytes
from kvsqueeze.compat import head_dim
from kvsqueeze.embedded import EMBEDDED_MODELS, EmbeddedModel
from kvsqueeze.models import converted_checkpoint_dir

KV_DTYPE = torch.float32


@dataclass
class ModelInfo:
    """One row of ``kvsqueeze models`` (None: unknown until the model is converted)."""

    name: str
    description: str
    installed: bool
    converted: bool
    checkpoint: str
    license_file: str | None
    requirements: list[str]
    architecture: str | None = None
    layers: int | None = None
    sliding_layers: int | None = None
    full_layers: int | None = None
    window: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    kv_dtype: str = str(KV_DTYPE).removeprefix("torch.")
    kv_bytes_per_token: int | None = None
    """Per token on every layer: while the context is shorter than the window (or with none)."""
    kv_bytes_per_token_beyond_window: int | None = None
    """Per token on the full-attention layers, once the sliding layers hold their window."""
    kv_bytes_sliding_held: int | None = None
    """What the sliding layers hold in all once their windows are full (0 without any)."""

    def to_dict(self) -> dict:
        return asdict(self)


def model_info(embedded: EmbeddedModel) -> ModelInfo:
    """Describe ``embedded`` from what is installed and converted on this machine."""
    checkpoint = converted_checkpoint_dir(embedded.name)
    license_path = embedded.license_path()
    info = ModelInfo(
        name=embedded.name,
        description=embedded.description,
        installed=embedded.installed(),
        converted=(checkpoint / "config.json").is_file(),
        checkpoint=str(checkpoint),
        license_file=None if license_path is None else str(license_path),
        requirements=list(embedded.requirements),
    )
    if info.converted:
        _add_shape(info, AutoConfig.from_pretrained(checkpoint))
    return info


def all_model_info() -> list[ModelInfo]:
    """``model_info`` of every embedded model, the default first."""
    return [model_info(embedded) for embedded in EMBEDDED_MODELS.values()]


def _add_shape(info: ModelInfo, config) -> None:
    text = config.get_text_config(decoder=True)
    windows = layer_windows(config)
    sliding = [window for window in windows if window is not None]
    info.architecture = (config.architectures or [type(config).__name__])[0]
    info.layers, info.sliding_layers = len(windows), len(sliding)
    info.full_layers = len(windows) - len(sliding)
    info.window = max(sliding, default=None)
    info.kv_heads, info.head_dim = int(text.num_key_value_heads), head_dim(text)
    info.kv_bytes_per_token = transformers_cache_bytes(config, 1, dtype=KV_DTYPE)
    beyond = max(sliding, default=1)
    held = transformers_cache_bytes(config, beyond, dtype=KV_DTYPE)
    per_token = transformers_cache_bytes(config, beyond + 1, dtype=KV_DTYPE) - held
    info.kv_bytes_per_token_beyond_window = per_token
    info.kv_bytes_sliding_held = held - beyond * per_token
