"""How a context is fed into a cache: ``PrefillStrategy``.

A strategy owns the forwards that bring a context into a ``CompressedCache`` (compression runs at
the end of each forward, see ``kvsqueeze.compression``), the peak of KV memory that costs, and
whether the states it passes through are valid prefix states (a server may save the state after
chunk ``k`` and resume another request from it). The recipe picks its strategy
(``Recipe.prefill_strategy``), so the engine and the server never branch on a method.

- ``ChunkedPrefill``: ``chunk_size`` tokens per forward, each compressed when it ends: peak =
  kept tokens + one chunk. A recipe that evicts and quantizes keeps the context in 16 bits until
  it is compressed, then quantizes it once (no block loses tokens after its scales were set).
  It may be fed in pieces (``start``/``stop`` on chunk boundaries, as a server's token budget per
  step does): the forwards, and so the cache, are those of one call.
- ``ReconstructionPrefill`` (KVzip): the whole context uncompressed, then, piece by piece, a
  repeat request and a piece of the context's copy, teacher-forced with the copy protected and
  cropped off; the context is compressed once, on the largest attention any piece gave each
  token. Peak = context + request + one piece, uncompressed; no reusable intermediate state, and
  it cannot be fed in pieces (it compresses the whole context at once).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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
    feeds_in_pieces = True
    """Whether ``prefill`` may stop at a chunk boundary (``stop``) and resume there (``start``) in a
    later call with the same result as one call; False when the context is compressed at once."""

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
        stop: int | None = None,
    ) -> torch.Tensor:
        """Feed the context ``ids [B, n]`` from token ``start`` on (the cache holds the first
        ``start``, e.g. a reused prefix state; ``mask [B, n]`` covers the whole context) up to
        token ``stop`` (default ``n``; a strategy that ``feeds_in_pieces`` resumes there in a later
        call, both multiples of ``chunk_size``). ``on_chunk(stop)`` runs once the cache holds a
        reusable state of ``ids[:, :stop]``. Returns the logits of the last position fed
        ``[B, vocab]``."""
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
    """``chunk_size`` tokens per forward, compressed as each ends (one forward if None); what is
    kept is quantized once the last piece is fed."""

    def prefill(
        self, model, cache, ids, mask, chunk_size=None, start=0, on_chunk=None, stop=None
    ) -> torch.Tensor:
        recipe = cache.recipe
        stop = ids.shape[1] if stop is None else stop
        piece, piece_mask = ids[:, start:stop], mask[:, :stop]
        report = None if on_chunk is None else (lambda end: on_chunk(start + end))
        if recipe is None or not recipe.evicts:
            return prefill(model, cache, piece, piece_mask, chunk_size, report)
        self._set_units(cache, ids, mask)
        with cache.settings(quantize_now=not recipe.encodes_blocks):
            logits = prefill(model, cache, piece, piece_mask, chunk_size, report)
        if stop == ids.shape[1]:
            cache.settle()
        return logits

    def peak_tokens(self, context: int, kept: int, chunk_size: int | None) -> int:
        if chunk_size is None:
            return context
        return min(context, kept + chunk_size)


REPEAT_REQUEST = "Repeat the previous context exactly."
"""What KVzip's reconstruction pass asks for before the copy of the context's first chunk."""

CONTINUE_REQUEST = "Repeat the part of the previous context exactly, starting with"
"""What it asks for before the copy of a later chunk, followed by the last ``RESUME_TOKENS`` of
the chunk before (so the model knows where the copy resumes, as KVzip's code does)."""

RESUME_TOKENS = 8

SMALLEST_CHUNK = 64
"""Copy tokens per reconstruction forward below which a context is refused (a context close to
the model's window leaves that little room after it)."""


@dataclass(frozen=True)
class RepeatRequests:
    """Token ids of KVzip's repeat requests in a tokenizer's chat template.

    ``header`` is the chat header that precedes a context (not copied: the copy is the user's
    text); ``first`` asks for the copy's first piece, ending the user's turn and opening the
    answer; a later piece is asked for with ``resume``, the last ``RESUME_TOKENS`` of the piece
    before it and ``turn_end``.
    """

    header: list[int]
    first: list[int]
    resume: list[int]
    turn_end: list[int]

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> RepeatRequests:
        marker = "<<context>>"
        header, turn_end = chat_prompt(tokenizer, marker).split(marker)
        return cls(
            header=tokenizer.encode(header, add_special_tokens=False),
            first=tokenizer.encode(f"\n\n{REPEAT_REQUEST}{turn_end}", add_special_tokens=False),
            resume=tokenizer.encode(f"\n\n{CONTINUE_REQUEST} ", add_special_tokens=False),
            turn_end=tokenizer.encode(turn_end, add_special_tokens=False),
        )

    def before(self, previous: list[int] | None) -> list[int]:
        """The request before the piece that follows ``previous`` (None: the first piece)."""
        if previous is None:
            return self.first
        return self.resume + previous[-RESUME_TOKENS:] + self.turn_end

    @property
    def longest(self) -> int:
        """Tokens of the longest request."""
        return max(len(self.first), len(self.resume) + RESUME_TOKENS + len(self.turn_end))


class ReconstructionPrefill(PrefillStrategy):
    """KVzip's pass: the context prefilled uncompressed, then, ``chunk`` copy tokens at a time,
    a repeat request and that piece of the copy, teacher-forced with the copy protected and
    cropped off after its forward; each context token scores its largest attention over every
    piece's queries, and the context is compressed once, after the last piece. The cache then
    holds context tokens only and the next token follows the context (a sliding-window layer
    holds the window it had before the copy: ``CompressedCache.past_recorded``). A quantizer
    quantizes what is kept only then. Peak = context + request + one piece, uncompressed; the
    pieces get shorter when the model's window has no room for ``chunk`` tokens after the context.
    """

    reuses_prefix_states = False
    sees_question = False
    feeds_in_pieces = False

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None = None, chunk: int = 2048):
        super().__init__(tokenizer)
        self.chunk = chunk
        self._requests: RepeatRequests | None = None

    @property
    def requests(self) -> RepeatRequests:
        if self._requests is None:
            self._requests = RepeatRequests.of(self.tokenizer)
        return self._requests

    def check(self, recipe) -> None:
        if self.tokenizer is None:
            raise ValueError(f"{recipe} reads the context's tokens: pass the tokenizer")

    def positions_needed(self, context: int) -> int:
        """The context, the longest repeat request and the shortest piece of copy accepted."""
        return context + self.requests.longest + min(self.chunk, context, SMALLEST_CHUNK)

    def piece_length(self, context: int, copy: int, limit: int) -> int:
        """Copy tokens per forward for a ``context``-token context whose copy has ``copy`` tokens,
        so that its positions stay within ``limit``; raises ``ContextTooLongError`` when not even
        ``SMALLEST_CHUNK`` of them fit."""
        wanted, smallest = min(self.chunk, copy), min(self.chunk, copy, SMALLEST_CHUNK)
        room = limit - context - self.requests.longest
        if room < smallest:
            raise ContextTooLongError(
                f"reconstructing a context to compress it needs room in the model's window after it for "
                f"a repeat request and {smallest} copied tokens: this context has {context} tokens, the "
                f"model supports {limit}; shorten the context to at most {context + room - smallest}"
            )
        return min(wanted, room)

    def prefill(
        self, model, cache, ids, mask, chunk_size=None, start=0, on_chunk=None, stop=None
    ) -> torch.Tensor:
        if start or stop not in (None, ids.shape[1]):
            raise ValueError("a reconstruction pass compresses a whole context: it cannot be fed in pieces")
        self._set_units(cache, ids, mask)
        copies = self._copies(ids, mask)
        longest = int(mask.sum(-1).max())
        piece = self.piece_length(
            longest, max(len(copy) for copy in copies), max_context_length(model, self.tokenizer)
        )
        with cache.settings(compress_prefill=False, quantize_now=False):
            logits = prefill(model, cache, ids, mask, chunk_size)
        context_length = cache.get_seq_length()
        cache.count_context(mask.sum(-1))
        tokenizer = self.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        settings = cache.settings(protect_from=context_length, quantize_now=False, defer_compression=True)
        with settings, cache.past_recorded():
            for rows in self._rounds(copies, piece):
                copy_ids, copy_mask = (t.to(ids.device) for t in left_pad(rows, pad_id))
                prefill(model, cache, copy_ids, torch.cat([mask, copy_mask], dim=1))
                cache.crop(-copy_ids.shape[1])
            cache.compress_observed()
        cache.settle()
        return logits

    def _copies(self, ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        """Per row, the context tokens to copy: its real tokens without the chat header."""
        header = self.requests.header
        copies = []
        for row_ids, row_mask in zip(ids.tolist(), mask[:, -ids.shape[1] :].tolist(), strict=True):
            row = [token for token, real in zip(row_ids, row_mask, strict=True) if real]
            copies.append(row[len(header) :] if row[: len(header)] == header else row)
        return copies

    def _rounds(self, copies: list[list[int]], piece: int) -> list[list[list[int]]]:
        """The rows of each reconstruction forward: per row, a repeat request and its next piece
        of copy. A row whose copy is done repeats its last forward, which leaves its largest
        attentions as they were."""
        feeds = []
        for copy in copies:
            pieces = [copy[i : i + piece] for i in range(0, len(copy), piece)] or [[]]
            feeds.append(
                [
                    self.requests.before(before) + now
                    for before, now in zip([None, *pieces[:-1]], pieces, strict=True)
                ]
            )
        rounds = max(len(row) for row in feeds)
        return [[row[min(k, len(row) - 1)] for row in feeds] for k in range(rounds)]

    def peak_tokens(self, context: int, kept: int, chunk_size: int | None) -> int:
        return context + self.requests.longest + min(self.chunk, context)
