"""The fitted per-layer model behind ``kvzap``: features, ridge fit, file, lookup.

A ``ScorePredictor`` holds, per (layer, KV head), a linear map from the features of a stored
token (``token_features``: what the scorer sees in an ordinary prefill, no hidden states) to the
log of KVzip's score. ``kvsqueeze calibrate --target kvzip`` fits it and saves it as JSON under
``$KVSQUEEZE_HOME/kvzap/<key>.json``; the embedded default model's ships in ``kvsqueeze/kvzap/``,
used when no user file exists.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch

from kvsqueeze.budgets.head_profile import profile_key
from kvsqueeze.calibrated_files import locate_calibrated
from kvsqueeze.models import kvsqueeze_home

FEATURES_VERSION = 1


class PredictorNotFoundError(ValueError):
    """No fitted ``kvzap`` model exists for a model (the message says how to make one)."""


def token_features(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``[..., L, D]`` post-RoPE keys and values -> ``[..., L, D // 2 + D]`` float32 features.

    Per RoPE pair of key dims (HF pairs ``i`` with ``i + D/2``), the pair's norm: RoPE rotates a
    pair and keeps its norm, so the features do not depend on the token's position (chunked
    prefill, left padding and a later reconstruction all see the same ones). Then the value's
    ``D`` entries (values are not rotated).
    """
    keys = keys.float()
    half = keys.shape[-1] // 2
    pair_norms = torch.sqrt(keys[..., :half] ** 2 + keys[..., half:] ** 2)
    return torch.cat([pair_norms, values.float()], dim=-1)


def fit_ridge(
    features: torch.Tensor, targets: torch.Tensor, alpha: float = 1.0
) -> tuple[torch.Tensor, float]:
    """Closed-form ridge regression ``targets [N] ~ features [N, F] @ w + b``.

    Features are standardised before the penalty ``alpha * ||w||^2`` applies (so it weighs every
    feature alike), the intercept is not penalised; returns ``(w [F], b)`` on the raw features.
    Float64 throughout: the normal equations of a few hundred thousand rows lose digits in float32.
    """
    x, y = features.double(), targets.double()
    mean, scale = x.mean(0), x.std(0).clamp(min=1e-12)
    z = (x - mean) / scale
    gram = z.T @ z + alpha * torch.eye(z.shape[1], dtype=z.dtype)
    weights = torch.linalg.solve(gram, z.T @ (y - y.mean())) / scale
    return weights.float(), float(y.mean() - mean @ weights)


@dataclass
class ScorePredictor:
    """Per (layer, KV head) linear maps from ``token_features`` to the log of KVzip's score.

    Attributes
    ----------
    model : the file's key (``profile_key`` of the model's name or path).
    weights : ``[layers][kv_heads][F]``; a layer KVzip never scored (a sliding-window layer) is 0.
    bias : ``[layers][kv_heads]``.
    training : how it was fitted (text source, tokens, texts, seed, ridge alpha, features version).
    quality : fit quality on held-out text (per-layer R^2 and Spearman rank correlation, ...).
    """

    model: str
    weights: list[list[list[float]]]
    bias: list[list[float]]
    training: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    _tensors: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(layers, kv_heads, features)``."""
        return len(self.weights), len(self.weights[0]), len(self.weights[0][0])

    def predict(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """``[B, Hkv, L, F]`` features of layer ``layer`` -> ``[B, Hkv, L]`` predicted log-scores."""
        if self._tensors is None:
            self._tensors = (torch.tensor(self.weights), torch.tensor(self.bias))
        weights, bias = (t[layer].to(features.device) for t in self._tensors)
        return torch.einsum("bhlf,hf->bhl", features, weights) + bias[None, :, None]

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        data["weights"] = [[[float(f"{w:.6g}") for w in head] for head in layer] for layer in self.weights]
        data["bias"] = [[float(f"{b:.6g}") for b in layer] for layer in self.bias]
        temporary = path.with_suffix(path.suffix + ".tmp")
        temporary.write_text(json.dumps(data, separators=(",", ":")) + "\n")
        temporary.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> ScorePredictor:
        data = json.loads(Path(path).read_text())
        keys = ("model", "weights", "bias", "training", "quality")
        return cls(**{key: data[key] for key in keys if key in data})


def user_predictor_path(name_or_path: str) -> Path:
    return kvsqueeze_home() / "kvzap" / f"{profile_key(name_or_path)}.json"


def shipped_predictor_path(name_or_path: str) -> Path:
    return Path(str(resources.files("kvsqueeze") / "kvzap" / f"{profile_key(name_or_path)}.json"))


def find_predictor(name_or_path: str, explicit: str = "") -> ScorePredictor:
    """The fitted ``kvzap`` model of a model: ``explicit`` if given, else the user's, else the
    shipped one."""
    model = name_or_path or "<model>"
    path = locate_calibrated(
        explicit,
        [user_predictor_path(name_or_path), shipped_predictor_path(name_or_path)],
        PredictorNotFoundError,
        "fitted kvzap model",
        model,
        f"run `kvsqueeze calibrate --model {model} --target kvzip` first, "
        "or pass one with kvzap:weights=FILE",
    )
    return ScorePredictor.load(path)
