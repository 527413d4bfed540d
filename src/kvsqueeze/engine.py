"""The generation loop: chunked prefill of the context, compression, question, decode.

Query-agnostic (default): the context is prefilled and compressed before the question is seen,
then the question is appended uncompressed — the realistic case for a context reused by many
questions. Query-aware: context and question are prefilled together and the question tokens are
protected, so scorers that look at recent queries (SnapKV) see the question. A scorer that
reconstructs (KVzip) compresses the context on a pass of its own (``prefill_context``) and never
sees the question, in either mode.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvsqueeze.attention import install
from kvsqueeze.cache import CompressedCache
from kvsqueeze.models import chat_prompt, max_context_length
from kvsqueeze.recipe import Recipe


class ContextTooLongError(ValueError):
    """The prompt plus the tokens to generate exceed what the model supports."""


@dataclass
class GenerationResult:
    """One answer with what it cost. Byte counts are measured after prefill (context + question);
    ``kv_bytes_16bit``/``kv_bytes_full_16bit`` count the model's KV at 16 bits (see
    ``CompressedCache.nbytes``), the reference the papers state ratios against."""

    answer: str
    recipe: str
    mode: str
    context_tokens: int
    question_tokens: int
    tokens_kept: int
    kv_bytes: int
    kv_bytes_full: int
    kv_bytes_16bit: int
    kv_bytes_full_16bit: int
    kv_dtype: str
    compression_ratio: float
    prefill_seconds: float
    decode_seconds: float
    generated_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def split_prompt(tokenizer: PreTrainedTokenizerBase, context: str, question: str) -> tuple[str, str]:
    """The chat prompt for "context, then question", split where the question starts."""
    text = chat_prompt(tokenizer, f"{context}\n\n{question}")
    cut = text.rindex(question) - 2
    return text[:cut], text[cut:]


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    return ids, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions as ``generate`` derives them: count of real tokens before, pads at 1."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


@torch.no_grad()
def prefill(
    model: PreTrainedModel,
    cache: CompressedCache,
    ids: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Feed ``ids [B, n]`` (``mask`` covers every token fed so far plus these) in chunks.

    Returns the logits of the last position ``[B, vocab]``.
    """
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
    return logits


REPEAT_REQUEST = "Repeat the previous context exactly."
"""What KVzip's reconstruction pass asks for before the copy of the context."""


def prefill_context(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    cache: CompressedCache,
    ids: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Prefill the context ``ids [B, n]`` compressed by the cache's recipe.

    Most recipes compress chunk by chunk as the context is fed (``prefill``). A recipe whose
    scorer reconstructs (KVzip) gets the context whole, uncompressed, then one more pass: a repeat
    request and a copy of each row's context, teacher-forced (``tokenizer`` frames the request).
    That pass is compressed with the copy protected, then the copy is cropped off the cache, so
    the cache afterwards holds context tokens only and the next token follows the context. A
    quantizer quantizes what is kept only then.

    A recipe with a unit (``words``) gets each context token's unit from ``tokenizer`` first.
    The context must be the first thing the cache is fed.

    Returns the logits of the last context position ``[B, vocab]``.
    """
    recipe = cache.recipe
    if recipe is None or not recipe.evicts:
        return prefill(model, cache, ids, mask, chunk_size)
    if tokenizer is None and (recipe.unit is not None or recipe.reconstructs):
        raise ValueError(f"{recipe} reads the context's tokens: pass the tokenizer")
    real = mask[:, -ids.shape[1] :]
    if recipe.unit is not None:
        cache.set_units(recipe.unit.unit_ids(tokenizer, ids, real))
    if not recipe.reconstructs:
        return prefill(model, cache, ids, mask, chunk_size)
    request, header = repeat_request(tokenizer)
    rows = []
    for row_ids, row_mask in zip(ids.tolist(), real.tolist(), strict=True):
        row = [token for token, real in zip(row_ids, row_mask, strict=True) if real]
        rows.append(request + (row[len(header) :] if row[: len(header)] == header else row))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    copy_ids, copy_mask = (t.to(ids.device) for t in _left_pad(rows, pad_id))
    needed, limit = mask.shape[1] + copy_ids.shape[1], max_context_length(model, tokenizer)
    if needed > limit:
        raise ContextTooLongError(
            f"{recipe.scorer.name} compresses a context by feeding it twice: this one needs {needed} "
            f"tokens but the model supports {limit}; shorten the context to less than half of that"
        )
    with cache.settings(compress_prefill=False, quantize_now=False):
        logits = prefill(model, cache, ids, mask, chunk_size)
    context_length = cache.get_seq_length()
    cache.count_context(mask.sum(-1))
    with cache.settings(protect_from=context_length, quantize_now=False):
        prefill(model, cache, copy_ids, torch.cat([mask, copy_mask], dim=1))
    cache.crop(copy_ids.shape[1])
    cache.settle()
    return logits


def repeat_request(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Token ids of the repeat request (ending the user's turn, opening the answer) and of the
    chat header that precedes a context (not copied: the copy is the user's text)."""
    marker = "<<context>>"
    header, turn_end = chat_prompt(tokenizer, marker).split(marker)
    request = tokenizer.encode(f"\n\n{REPEAT_REQUEST}{turn_end}", add_special_tokens=False)
    return request, tokenizer.encode(header, add_special_tokens=False)


def _footprint(cache: CompressedCache) -> dict:
    """What the cache holds now: the byte and token fields of ``GenerationResult``."""
    kv_bytes, kv_bytes_full = cache.nbytes(), cache.nbytes_full()
    return dict(
        tokens_kept=cache.tokens_kept() // max(len(cache.layers) * cache.layers[0].lengths.numel(), 1),
        kv_bytes=kv_bytes,
        kv_bytes_full=kv_bytes_full,
        kv_bytes_16bit=cache.nbytes(torch.float16),
        kv_bytes_full_16bit=cache.nbytes_full(torch.float16),
        kv_dtype=str(cache.kv_dtype).removeprefix("torch."),
        compression_ratio=1.0 - kv_bytes / kv_bytes_full,
    )


def _answer_text(tokenizer: PreTrainedTokenizerBase, tokens: list[int], eos: set[int]) -> str:
    return tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True).strip()


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Token ids that end an answer: the tokenizer's and the generation config's."""
    ids = {tokenizer.eos_token_id}
    configured = model.generation_config.eos_token_id
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


@torch.no_grad()
def decode(
    model: PreTrainedModel,
    cache: CompressedCache,
    logits: torch.Tensor,
    mask: torch.Tensor,
    eos_ids: set[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Greedy (or sampled, ``temperature > 0``) decoding until every row hit eos or the limit."""
    batch = logits.shape[0]
    outputs: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool)
    positions = positions_from_mask(mask)[:, -1:]
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long)
    for _ in range(max_new_tokens):
        if temperature > 0:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            tokens = logits.argmax(-1)
        for row in range(batch):
            if not done[row]:
                outputs[row].append(int(tokens[row]))
        done |= torch.isin(tokens.cpu(), eos)
        if bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        positions = positions + 1
        out = model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        logits = out.logits[:, -1]
    return outputs


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    context: str,
    question: str,
    recipe: Recipe | str = "full",
    query_aware: bool = False,
    chunk_size: int | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
) -> GenerationResult:
    """Answer ``question`` about ``context`` with the KV cache compressed by ``recipe``."""
    return generate_batch(
        model,
        tokenizer,
        [(context, question)],
        recipe,
        query_aware,
        chunk_size,
        max_new_tokens,
        temperature,
        seed,
    )[0]


def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[tuple[str, str]],
    recipe: Recipe | str = "full",
    query_aware: bool = False,
    chunk_size: int | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[GenerationResult]:
    """Batched ``generate``: contexts left-padded to one length, then questions left-padded.

    Byte counts in the results are for the whole batch's cache.
    """
    recipe = Recipe.parse(recipe) if isinstance(recipe, str) else recipe
    install(model)
    device = model.device
    splits = [split_prompt(tokenizer, context, question) for context, question in pairs]
    context_rows = [tokenizer.encode(c, add_special_tokens=False) for c, _ in splits]
    question_rows = [tokenizer.encode(q, add_special_tokens=False) for _, q in splits]
    _check_length(model, tokenizer, context_rows, question_rows, max_new_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    context_ids, context_mask = (t.to(device) for t in _left_pad(context_rows, pad_id))
    question_ids, question_mask = (t.to(device) for t in _left_pad(question_rows, pad_id))
    mask = torch.cat([context_mask, question_mask], dim=1)

    cache = CompressedCache(recipe)
    start = time.perf_counter()
    if query_aware and not recipe.reconstructs:
        with cache.settings(protect_from=context_ids.shape[1]):
            ids = torch.cat([context_ids, question_ids], dim=1)
            logits = prefill_context(model, tokenizer, cache, ids, mask, chunk_size)
    else:
        prefill_context(model, tokenizer, cache, context_ids, context_mask, chunk_size)
        with cache.settings(compress_prefill=False):
            logits = prefill(model, cache, question_ids, mask)
    prefill_seconds = time.perf_counter() - start
    footprint = _footprint(cache)

    eos = eos_ids(model, tokenizer)
    start = time.perf_counter()
    generator = torch.Generator(device=device).manual_seed(seed)
    outputs = decode(model, cache, logits, mask, eos, max_new_tokens, temperature, generator)
    decode_seconds = time.perf_counter() - start
    return [
        GenerationResult(
            answer=_answer_text(tokenizer, tokens, eos),
            recipe=str(recipe),
            mode="query-aware" if query_aware else "query-agnostic",
            context_tokens=len(context_row),
            question_tokens=len(question_row),
            **footprint,
            prefill_seconds=prefill_seconds,
            decode_seconds=decode_seconds,
            generated_tokens=len(tokens),
        )
        for tokens, context_row, question_row in zip(outputs, context_rows, question_rows, strict=True)
    ]


def _check_length(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    context_rows: list[list[int]],
    question_rows: list[list[int]],
    max_new_tokens: int,
) -> None:
    limit = max_context_length(model, tokenizer)
    needed = max(len(c) for c in context_rows) + max(len(q) for q in question_rows) + max_new_tokens
    if needed > limit:
        raise ContextTooLongError(
            f"prompt needs {needed} tokens (context + question + {max_new_tokens} new) but the model "
            f"supports {limit}; shorten the context or lower --max-new-tokens"
        )


def generate_multiturn(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    context: str,
    questions: list[str],
    recipe: Recipe | str = "full",
    query_aware: bool = False,
    chunk_size: int | None = None,
    max_new_tokens: int = 32,
    answer_prefix: str | list[str] = "",
) -> list[GenerationResult]:
    """Compress ``context`` once, then answer each question against a copy of that cache.

    The shared-context case of SCBench (Li et al., 2024, arXiv:2412.10319): a context is
    compressed once and reused by several different requests. Query-agnostic (default): the
    context is compressed before any question is seen. Query-aware: the context is compressed
    together with the *first* question (protected, as in ``generate``); later questions reuse that
    cache with the first question's tokens evicted, so they see a context compressed for another
    question. ``answer_prefix`` (one for all questions, or one per question) is appended after the
    assistant header and is not part of the answer.

    Returns one ``GenerationResult`` per question, greedy decoding. Bytes are measured after the
    question's prefill; ``prefill_seconds`` of the first turn includes the context prefill, later
    turns count only their question.
    """
    recipe = Recipe.parse(recipe) if isinstance(recipe, str) else recipe
    install(model)
    device = model.device
    splits = [split_prompt(tokenizer, context, question) for question in questions]
    if len({head for head, _ in splits}) != 1:
        raise ValueError("the chat template frames the context differently per question")
    context_row = tokenizer.encode(splits[0][0], add_special_tokens=False)
    prefixes = [answer_prefix] * len(questions) if isinstance(answer_prefix, str) else list(answer_prefix)
    question_rows = [
        tokenizer.encode(tail + prefix, add_special_tokens=False)
        for (_, tail), prefix in zip(splits, prefixes, strict=True)
    ]
    _check_length(model, tokenizer, [context_row], question_rows, max_new_tokens)
    context_ids = torch.tensor([context_row], device=device)
    eos = eos_ids(model, tokenizer)
    mode = "query-aware" if query_aware else "query-agnostic"

    shared = CompressedCache(recipe)
    start = time.perf_counter()
    first_logits = None
    sees_question = query_aware and not recipe.reconstructs
    if sees_question:
        ids = torch.cat([context_ids, torch.tensor([question_rows[0]], device=device)], dim=1)
        with shared.settings(protect_from=len(context_row)):
            first_logits = prefill_context(model, tokenizer, shared, ids, torch.ones_like(ids), chunk_size)
    else:
        prefill_context(model, tokenizer, shared, context_ids, torch.ones_like(context_ids), chunk_size)
    context_seconds = time.perf_counter() - start

    results = []
    for turn, question_row in enumerate(question_rows):
        start = time.perf_counter()
        cache = copy.deepcopy(shared)
        if sees_question and turn == 0:
            logits = first_logits
        else:
            if sees_question:
                cache.crop(cache.get_seq_length() - len(context_row))
            ids = torch.tensor([question_row], device=device)
            mask = torch.ones((1, cache.get_seq_length() + ids.shape[1]), dtype=torch.long, device=device)
            with cache.settings(compress_prefill=False):
                logits = prefill(model, cache, ids, mask)
        mask = torch.ones((1, cache.get_seq_length()), dtype=torch.long, device=device)
        prefill_seconds = time.perf_counter() - start + (context_seconds if turn == 0 else 0.0)
        footprint = _footprint(cache)
        start = time.perf_counter()
        tokens = decode(model, cache, logits, mask, eos, max_new_tokens)[0]
        results.append(
            GenerationResult(
                answer=_answer_text(tokenizer, tokens, eos),
                recipe=str(recipe),
                mode=mode,
                context_tokens=len(context_row),
                question_tokens=len(question_row),
                **footprint,
                prefill_seconds=prefill_seconds,
                decode_seconds=time.perf_counter() - start,
                generated_tokens=len(tokens),
            )
        )
    return results


@dataclass
class ContinuationLogits:
    """Next-token logits over a held continuation, after a (compressed) context prefix.

    ``logits [n, vocab]``: row ``i`` predicts continuation token ``i``. Bytes are measured after the
    context prefill (before the continuation is fed).
    """

    logits: torch.Tensor
    footprint: dict
    """``kv_bytes``, ``kv_bytes_full``, their 16-bit counterparts, ``kv_dtype`` (see ``GenerationResult``)."""
    seconds: float


@torch.no_grad()
def continuation_logits(
    model: PreTrainedModel,
    context_ids: list[int],
    continuation_ids: list[int],
    recipe: Recipe | str = "full",
    chunk_size: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> ContinuationLogits:
    """Prefill ``context_ids`` compressed by ``recipe``, then teacher-force ``continuation_ids``.

    The continuation is fed uncompressed (``compress_prefill=False``) in one forward, so every
    prediction sees the compressed context plus the true continuation so far. ``tokenizer`` is
    needed only by recipes that reconstruct the context (``prefill_context``).
    """
    recipe = Recipe.parse(recipe) if isinstance(recipe, str) else recipe
    install(model)
    device = model.device
    cache = CompressedCache(recipe)
    start = time.perf_counter()
    ids = torch.tensor([context_ids], device=device)
    first = prefill_context(model, tokenizer, cache, ids, torch.ones_like(ids), chunk_size)
    footprint = _footprint(cache)
    rows = [first.float()]
    if len(continuation_ids) > 1:
        fed = torch.tensor([continuation_ids[:-1]], device=device)
        past = cache.get_seq_length()
        mask = torch.ones((1, past + fed.shape[1]), dtype=torch.long, device=device)
        with cache.settings(compress_prefill=False):
            out = model(
                input_ids=fed,
                attention_mask=mask,
                position_ids=positions_from_mask(mask)[:, past:],
                past_key_values=cache,
                use_cache=True,
            )
        rows.append(out.logits[0].float())
    return ContinuationLogits(
        logits=torch.cat(rows).cpu(),
        footprint=footprint,
        seconds=time.perf_counter() - start,
    )
