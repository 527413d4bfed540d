"""How a context is fed into a cache: ``PrefillStrategy``.

A strategy owns the forwards that bring a context into a ``CompressedCache`` (compression runs at
the end of each forward, see ``kvsqueeze.compression``), the peak of KV memory that costs, and
whether the states it passes through are valid prefix states (a server may save the state after
chunk ``k`` and resume another request from it). The recipe picks its strategy
(``Recipe.prefill_strategy``), so the engine and the server never branch on a method.

- ``ChunkedPrefill``: ``chunk_size`` tokens per forward, each compressed when it ends: peak =
  kept tokens + one chunk. A recipe that evicts and quantizes keeps the context in 16 bits until
  it is compressed, then quantizes it once (no block loses tokens after its scales were set).
- ``ReconstructionPrefill`` (KVzip): the whole context uncompressed, then a repeat request and a
  copy of the context, teacher-forced and compressed with the copy protected; the copy is then
  cropped off. Peak = context + request + copy, uncompressed; no reusable intermediate state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvsqueeze.models import chat_prompt, max_context_length

if TYPE_CHECKING:
    from kvsqueeze.cache import CompressedCache

# the server's context chunk (and prefix-reuse block); eval defaults to it, so scores are measured
# on the prefill that is served
DEFAULT_CHUNK_SIZE = 256


class ContextTooLongError(ValueError):
    """The prompt plus the tokens to generate exceed what the model supports."""


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions as ``generate`` derives them: count of real tokens before, pads at 1."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded to the longest: ``(ids [B, n], mask [B, n])``."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    return ids, mask


@torch.no_grad()
def prefill(
    model: PreTrainedModel,
    cache: CompressedCache,
    ids: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Feed ``ids [B, n]`` (``mask`` covers every token fed so far plus these) in chunks;
    ``on_chunk(stop)`` runs after the forward of ``ids[:, :stop]``. Returns the logits of the
    last position ``[B, vocab]``."""
    past = cache.get_seq_length()
    positions = positions_from_mask(mask)[:, past:]
    step = chunk_size or ids.shape[1]
    logits = None
    for start in range(0, ids.shape[1], step):
        stop = min(start + step, ids.shape[1])
        out = model(
            input_ids=ids[:, start:stop],
            attention_mask=mask[:, : past + stop],
            position_ids=positions[:, start:stop],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1]
        if on_chunk is not None:
            on_chunk(stop)
    return logits


class PrefillStrategy:
    """Feeds a context into a cache (see module docstring); ``tokenizer`` is needed by recipes
    that read the context's tokens (a unit such as ``words``, a reconstruction pass)."""

    reuses_prefix_states = True
    sees_question = True
    """Whether a question prefilled after the context takes part in its compression (query-aware
    mode); False when the context is compressed on a pass of its own."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None = None):
        self.tokenizer = tokenizer

    def prefill(
        self,
        model: PreTrainedModel,
        cache: CompressedCache,
        ids: torch.Tensor,
        mask: torch.Tensor,
        chunk_size: int | None = None,
        start: int = 0,
        on_chunk: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Feed the context ``ids [B, n]`` from token ``start`` on (the cache holds the first
        ``start``, e.g. a reused prefix state; ``mask [B, n]`` covers the whole context).
        ``on_chunk(stop)`` runs once the cache holds a reusable state of ``ids[:, :stop]``.
        Returns the logits of the last context position ``[B, vocab]``."""
        raise NotImplementedError

    def peak_tokens(self, context: int, kept: int, chunk_size: int | None) -> int:
        """Tokens a head holds at the peak of compressing a ``context``-token context down to
        ``kept`` (before anything is quantized)."""
        raise NotImplementedError

    def positions_needed(self, context: int) -> int:
        """Positions of the model's window that feeding a ``context``-token context uses."""
        return context

    def check(self, recipe) -> None:
        """Raise ``ValueError`` if this strategy cannot feed ``recipe``'s contexts (no tokenizer
        for a recipe that reads the context's tokens)."""
        if recipe.unit is not None and self.tokenizer is None:
            raise ValueError(f"{recipe} reads the context's tokens: pass the tokenizer")

    def _set_units(self, cache: CompressedCache, ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.check(cache.recipe)
        if cache.recipe.unit is not None:
            cache.set_units(cache.recipe.unit.unit_ids(self.tokenizer, ids, mask[:, -ids.shape[1] :]))


class ChunkedPrefill(PrefillStrategy):
    """``chunk_size`` tokens per forward, compressed as each ends (one forward if None)."""

    def prefill(self, model, cache, ids, mask, chunk_size=None, start=0, on_chunk=None) -> torch.Tensor:
        recipe = cache.recipe
        report = None if on_chunk is None else (lambda stop: on_chunk(start + stop))
        if recipe is None or not recipe.evicts:
            return prefill(model, cache, ids[:, start:], mask, chunk_size, report)
        self._set_units(cache, ids, mask)
        with cache.settings(quantize_now=recipe.quantizer is None):
            logits = prefill(model, cache, ids[:, start:], mask, chunk_size, report)
        cache.settle()
        return logits

    def peak_tokens(self, context: int, kept: int, chunk_size: int | None) -> int:
        if chunk_size is None:
            return context
        return min(context, kept + chunk_size)


REPEAT_REQUEST = "Repeat the previous context exactly."
"""What KVzip's reconstruction pass asks for before the copy of the context."""


def repeat_request(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Token ids of the repeat request (ending the user's turn, opening the answer) and of the
    chat header that precedes a context (not copied: the copy is the user's text)."""
    marker = "<<context>>"
    header, turn_end = chat_prompt(tokenizer, marker).split(marker)
    request = tokenizer.encode(f"\n\n{REPEAT_REQUEST}{turn_end}", add_special_tokens=False)
    return request, tokenizer.encode(header, add_special_tokens=False)


class ReconstructionPrefill(PrefillStrategy):
    """KVzip's pass: the context whole, then a repeat request and its copy, compressed with the
    copy protected; the copy is cropped off, so the cache then holds context tokens only and the
    next token follows the context. A quantizer quantizes what is kept only then."""

    reuses_prefix_states = False
    sees_question = False

    def check(self, recipe) -> None:
        if self.tokenizer is None:
            raise ValueError(f"{recipe} reads the context's tokens: pass the tokenizer")

    def positions_needed(self, context: int) -> int:
        """The context, the repeat request and the copy."""
        return 2 * context + len(repeat_request(self.tokenizer)[0])

    def prefill(self, model, cache, ids, mask, chunk_size=None, start=0, on_chunk=None) -> torch.Tensor:
        if start:
            raise ValueError("a reconstruction pass compresses a whole context: it cannot resume a prefix")
        self._set_units(cache, ids, mask)
        tokenizer = self.tokenizer
        request, header = repeat_request(tokenizer)
        rows = []
        for row_ids, row_mask in zip(ids.tolist(), mask[:, -ids.shape[1] :].tolist(), strict=True):
            row = [token for token, real in zip(row_ids, row_mask, strict=True) if real]
            rows.append(request + (row[len(header) :] if row[: len(header)] == header else row))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        copy_ids, copy_mask = (t.to(ids.device) for t in left_pad(rows, pad_id))
        needed, limit = mask.shape[1] + copy_ids.shape[1], max_context_length(model, tokenizer)
        if needed > limit:
            raise ContextTooLongError(
                f"{cache.recipe.scorer.name} compresses a context by feeding it twice: this one needs "
                f"{needed} tokens but the model supports {limit}; shorten the context to less than half of "
                "that"
            )
        with cache.settings(compress_prefill=False, quantize_now=False):
            logits = prefill(model, cache, ids, mask, chunk_size)
        context_length = cache.get_seq_length()
        cache.count_context(mask.sum(-1))
        with cache.settings(protect_from=context_length, quantize_now=False):
            prefill(model, cache, copy_ids, torch.cat([mask, copy_mask], dim=1))
        cache.crop(-copy_ids.shape[1])
        cache.settle()
        return logits

    def peak_tokens(self, context: int, kept: int, chunk_size: int | None) -> int:
        return self.positions_needed(context)
