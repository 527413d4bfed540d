"""kvsqueeze: KV-cache compression and management for Hugging Face transformers."""

from kvsqueeze.attention import install
from kvsqueeze.cache import CompressedCache
from kvsqueeze.engine import GenerationResult, generate, generate_batch, prefill_context
from kvsqueeze.models import DEFAULT_MODEL, load_model
from kvsqueeze.recipe import Recipe

__all__ = [
    "DEFAULT_MODEL",
    "CompressedCache",
    "GenerationResult",
    "Recipe",
    "generate",
    "generate_batch",
    "install",
    "load_model",
    "prefill_context",
]
