"""Per-model head profiles: how much each KV head retrieves from far context (``kvsqueeze calibrate``).

A profile is a small JSON file keyed by the model's name: one score per (layer, KV head), the probe
settings that produced them, and the model's shape. User profiles live in
``$KVSQUEEZE_HOME/profiles/<key>.json``; profiles shipped with the package (the embedded default
model's) in ``kvsqueeze/profiles/``, used when no user profile exists.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch

from kvsqueeze.calibrated_files import locate_calibrated
from kvsqueeze.models import kvsqueeze_home


class ProfileNotFoundError(ValueError):
    """No head profile exists for a model (the message says how to make one)."""


@dataclass
class HeadProfile:
    """Retrieval scores of every KV head of one model.

    Attributes
    ----------
    model : the profile's key (``profile_key`` of the model's name or path).
    scores : ``[layers][kv_heads]`` retrieval score; higher = the head fetches far tokens.
    probe : the settings of the probe that measured them (kind, samples, seed, ...).
    """

    model: str
    scores: list[list[float]]
    probe: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.scores), len(self.scores[0]) if self.scores else 0

    def retrieval_heads(self, fraction: float) -> torch.Tensor:
        """``[layers, kv_heads]`` bool: the ``round(fraction * heads)`` best-scoring heads, model-wide.

        Ties go to the earlier (layer, head).
        """
        scores = torch.tensor(self.scores, dtype=torch.float64)
        count = math.floor(fraction * scores.numel() + 0.5)
        order = torch.argsort(scores.flatten(), descending=True, stable=True)[:count]
        chosen = torch.zeros(scores.numel(), dtype=torch.bool)
        chosen[order] = True
        return chosen.reshape(scores.shape)

    def ranked(self) -> list[tuple[int, int, float]]:
        """``(layer, head, score)`` from the highest score down."""
        flat = [(layer, head, s) for layer, row in enumerate(self.scores) for head, s in enumerate(row)]
        return sorted(flat, key=lambda item: -item[2])

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        data["scores"] = "SCORES"
        rows = ",\n".join("  " + json.dumps([round(s, 6) for s in row]) for row in self.scores)
        text = json.dumps(data, indent=1).replace('"SCORES"', "[\n" + rows + "\n ]")
        temporary = path.with_suffix(path.suffix + ".tmp")
        temporary.write_text(text + "\n")
        temporary.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> HeadProfile:
        data = json.loads(Path(path).read_text())
        return cls(model=data["model"], scores=data["scores"], probe=data.get("probe", {}))


def profile_key(name_or_path: str) -> str:
    """File-name key of a model: a local directory's name, or the hub id with ``/`` as ``--``."""
    path = Path(name_or_path).expanduser()
    if path.is_absolute() or path.exists():
        return path.name
    return name_or_path.strip("/").replace("/", "--")


def user_profile_path(name_or_path: str) -> Path:
    return kvsqueeze_home() / "profiles" / f"{profile_key(name_or_path)}.json"


def shipped_profile_path(name_or_path: str) -> Path:
    return Path(str(resources.files("kvsqueeze") / "profiles" / f"{profile_key(name_or_path)}.json"))


def find_profile(name_or_path: str, explicit: str = "") -> HeadProfile:
    """The head profile of a model: ``explicit`` if given, else the user's, else the shipped one."""
    model = name_or_path or "<model>"
    path = locate_calibrated(
        explicit,
        [user_profile_path(name_or_path), shipped_profile_path(name_or_path)],
        ProfileNotFoundError,
        "head profile",
        model,
        f"run `kvsqueeze calibrate --model {model}` first, or pass one with duo:profile=FILE",
    )
    return HeadProfile.load(path)
