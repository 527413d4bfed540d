"""The generation loop: chunked prefill of the context, compression, question, decode.

Query-agnostic (default): the context is prefilled and compressed before the question is seen,
then the question is appended uncompressed — the realistic case for a context reused by many
questions. Query-aware: context and question are prefilled together and the question tokens are
protected, so scorers that look at recent queries (SnapKV) see the question. How a context is
fed is the recipe's ``PrefillStrategy`` (``kvsqueeze.prefill``): chunk by chunk, or KVzip's
reconstruction pass, which never sees the question, in either mode.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import Cache, PreTrainedModel, PreTrainedTokenizerBase

from kvsqueeze.attention import install
from kvsqueeze.cache import CompressedCache
from kvsqueeze.models import chat_prompt, max_context_length
from kvsqueeze.prefill import ContextTooLongError, left_pad, positions_from_mask, prefill
from kvsqueeze.recipe import Recipe
from kvsqueeze.serve.text import TextStream


@dataclass
class GenerationResult:
    """One answer with what it cost. Byte counts are measured after prefill (context + question);
    ``kv_bytes_16bit``/``kv_bytes_full_16bit`` count the model's KV at 16 bits (see
    ``CompressedCache.nbytes``), the reference the papers state ratios against.
    ``kv_bytes_peak`` is the largest ``nbytes()`` over the whole run (at the end of a forward,
    before its compression) and ``kv_bytes_end`` what is held after the last token.
    ``compressed_layers`` lists the layers the recipe compressed (evicted or quantized) out of
    ``layers``; the others hold what transformers' default cache holds (a sliding-window layer
    its last ``window - 1`` tokens, unless the recipe has ``sliding``)."""

    answer: str
    recipe: str
    mode: str
    context_tokens: int
    question_tokens: int
    tokens_kept: int
    layers: int
    compressed_layers: list[int]
    kv_bytes: int
    kv_bytes_full: int
    kv_bytes_16bit: int
    kv_bytes_full_16bit: int
    kv_dtype: str
    compression_ratio: float
    prefill_seconds: float
    decode_seconds: float
    generated_tokens: int
    kv_bytes_peak: int
    kv_bytes_end: int

    def to_dict(self) -> dict:
        return asdict(self)


def split_prompt(
    tokenizer: PreTrainedTokenizerBase, context: str, question: str, answer_prefix: str = ""
) -> tuple[str, str]:
    """The prompt for "context, then question" (``chat_prompt``, ending with ``answer_prefix``),
    split where the question starts."""
    text = chat_prompt(tokenizer, f"{context}\n\n{question}", answer_prefix)
    cut = text.rindex(question) - 2
    return text[:cut], text[cut:]


def prefill_context(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    cache: CompressedCache,
    ids: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Prefill the context ``ids [B, n]`` compressed by the cache's recipe, the way its
    ``PrefillStrategy`` feeds a context (chunk by chunk; KVzip: a reconstruction pass).

    ``tokenizer`` is needed by recipes that read the context's tokens (a unit such as
    ``words``, a reconstruction pass). The context must be the first thing the cache is fed.
    Returns the logits of the last context position ``[B, vocab]``.
    """
    if cache.recipe is None:
        return prefill(model, cache, ids, mask, chunk_size)
    return cache.recipe.prefill_strategy(tokenizer).prefill(model, cache, ids, mask, chunk_size)


def footprint_of(cache: CompressedCache) -> dict:
    """What the cache holds now: the byte and token fields of ``GenerationResult``."""
    kv_bytes, kv_bytes_full = cache.nbytes(), cache.nbytes_full()
    compressed = [
        index
        for index, layer in enumerate(cache.layers)
        if (recipe := cache.recipe_for(layer)) is not None and not recipe.is_full
    ]
    return dict(
        tokens_kept=cache.tokens_kept() // max(len(cache.layers) * cache.layers[0].held_lengths().numel(), 1),
        layers=len(cache.layers),
        compressed_layers=compressed,
        kv_bytes=kv_bytes,
        kv_bytes_full=kv_bytes_full,
        kv_bytes_16bit=cache.nbytes(torch.float16),
        kv_bytes_full_16bit=cache.nbytes_full(torch.float16),
        kv_dtype=str(cache.kv_dtype).removeprefix("torch."),
        compression_ratio=1.0 - kv_bytes / kv_bytes_full,
    )


def end_bytes_of(cache: CompressedCache) -> dict:
    """``kv_bytes_peak`` and ``kv_bytes_end`` of a cache whose answer is complete."""
    end = cache.nbytes()
    return dict(kv_bytes_peak=max(cache.nbytes_peak, end), kv_bytes_end=end)


def answer_text(
    tokenizer: PreTrainedTokenizerBase, tokens: list[int], eos: set[int], stop: Sequence[str] = ()
) -> str:
    """The answer ``tokens`` as text, without eos tokens and cut before the first ``stop`` string."""
    text = tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True)
    for marker in stop:
        text = text.split(marker, 1)[0]
    return text.strip()


def stop_check(
    tokenizer: PreTrainedTokenizerBase, eos: set[int], stop: Sequence[str], batch: int
) -> Callable[[int, int], bool] | None:
    """``stopped(row, token)``: True once row ``row``'s answer text holds one of ``stop`` (None
    if there is none), detokenized incrementally per row (``TextStream``)."""
    if not stop:
        return None
    streams = [TextStream(tokenizer, frozenset(eos), list(stop)) for _ in range(batch)]

    def stopped(row: int, token: int) -> bool:
        streams[row].push(token)
        return streams[row].stopped

    return stopped


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
    stopped: Callable[[int, int], bool] | None = None,
) -> list[list[int]]:
    """Greedy (or sampled, ``temperature > 0``) decoding until every row hit eos, ``stopped``
    (called with each row's new token, ``stop_check``) ended it, or the limit."""
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
                done[row] = stopped is not None and stopped(row, int(tokens[row]))
        done |= torch.isin(tokens.cpu(), eos)
        if bool(done.all()):
            break
        logits, mask, positions = decode_step(model, cache, tokens, mask, positions)
    return outputs


@dataclass
class DecodeTrace:
    """What ``decode_trace`` fed and saw, one entry per step.

    ``logits [n, vocab]`` (float32, on the CPU): row ``i`` is the prediction of ``tokens[i]``;
    ``kv_bytes[i]`` is ``cache.nbytes()`` once ``tokens[i]`` is in the cache (after the step's
    compression, if any); ``mask`` covers the cache after the last one.
    """

    tokens: list[int]
    logits: torch.Tensor
    kv_bytes: list[int]
    mask: torch.Tensor
    seconds: float


@torch.no_grad()
def decode_trace(
    model: PreTrainedModel,
    cache: CompressedCache,
    logits: torch.Tensor,
    mask: torch.Tensor,
    steps: int,
    forced: list[int] | None = None,
    banned: set[int] | frozenset[int] = frozenset(),
) -> DecodeTrace:
    """Feed ``steps`` tokens to a one-row cache, one decode step each, as generation would:
    the greedy choice among the tokens not ``banned`` (a long answer that must not stop at eos),
    or ``forced[i]`` (teacher forcing, so another cache can be compared on the same answer).

    ``logits [1, vocab]`` predicts the first token and ``mask [1, n]`` covers what the cache holds.
    A decoding component compresses on its own period exactly as in ``decode``.
    """
    if forced is not None and len(forced) < steps:
        raise ValueError(f"forced has {len(forced)} tokens, fewer than the {steps} steps asked")
    ban = torch.tensor(sorted(banned), dtype=torch.long, device=logits.device)
    positions = positions_from_mask(mask)[:, -1:]
    tokens, rows, held = [], [], []
    start = time.perf_counter()
    for step in range(steps):
        rows.append(logits[0].float().cpu())
        if forced is not None:
            token = forced[step]
        else:
            token = int(logits[0].index_fill(0, ban, float("-inf")).argmax())
        tokens.append(token)
        fed = torch.tensor([token], device=logits.device)
        logits, mask, positions = decode_step(model, cache, fed, mask, positions)
        held.append(cache.nbytes())
    return DecodeTrace(
        tokens=tokens,
        logits=torch.stack(rows) if rows else torch.empty(0),
        kv_bytes=held,
        mask=mask,
        seconds=time.perf_counter() - start,
    )


def decode_step(
    model: PreTrainedModel,
    cache: Cache,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Feed one token per row (``tokens [B]``) after ``mask [B, n]`` whose last position per row
    is ``positions [B, 1]``: ``(next logits [B, vocab], mask [B, n + 1], positions + 1)``."""
    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    positions = positions + 1
    out = model(
        input_ids=tokens[:, None],
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
    )
    return out.logits[:, -1], mask, positions


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
    answer_prefix: str = "",
    stop: Sequence[str] = (),
) -> GenerationResult:
    """Answer ``question`` about ``context`` with the KV cache compressed by ``recipe``.

    ``answer_prefix`` is the start of the answer the model continues (``chat_prompt``; RULER's
    convention, e.g. ``"The pass key is"``); it is not part of the returned answer. Decoding
    ends at the first of the ``stop`` strings (e.g. ``"\n"`` for a base model that goes on after
    its answer), which the answer does not include.
    """
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
        answer_prefix,
        stop,
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
    answer_prefix: str = "",
    stop: Sequence[str] = (),
) -> list[GenerationResult]:
    """Batched ``generate``: contexts left-padded to one length, then questions left-padded.

    Byte counts in the results are for the whole batch's cache.
    """
    recipe = Recipe.parse(recipe) if isinstance(recipe, str) else recipe
    install(model)
    device = model.device
    splits = [split_prompt(tokenizer, context, question, answer_prefix) for context, question in pairs]
    context_rows = [tokenizer.encode(c, add_special_tokens=False) for c, _ in splits]
    question_rows = [tokenizer.encode(q, add_special_tokens=False) for _, q in splits]
    _check_length(model, tokenizer, context_rows, question_rows, max_new_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    context_ids, context_mask = (t.to(device) for t in left_pad(context_rows, pad_id))
    question_ids, question_mask = (t.to(device) for t in left_pad(question_rows, pad_id))
    mask = torch.cat([context_mask, question_mask], dim=1)

    cache = CompressedCache(recipe, config=model.config)
    start = time.perf_counter()
    if query_aware and recipe.prefill_strategy().sees_question:
        with cache.settings(protect_from=context_ids.shape[1]):
            ids = torch.cat([context_ids, question_ids], dim=1)
            logits = prefill_context(model, tokenizer, cache, ids, mask, chunk_size)
    else:
        prefill_context(model, tokenizer, cache, context_ids, context_mask, chunk_size)
        with cache.settings(compress_prefill=False):
            logits = prefill(model, cache, question_ids, mask)
    prefill_seconds = time.perf_counter() - start
    footprint = footprint_of(cache)

    eos = eos_ids(model, tokenizer)
    start = time.perf_counter()
    generator = torch.Generator(device=device).manual_seed(seed)
    stopped = stop_check(tokenizer, eos, stop, len(pairs))
    outputs = decode(model, cache, logits, mask, eos, max_new_tokens, temperature, generator, stopped)
    decode_seconds = time.perf_counter() - start
    end_bytes = end_bytes_of(cache)
    return [
        GenerationResult(
            answer=answer_text(tokenizer, tokens, eos, stop),
            recipe=str(recipe),
            mode="query-aware" if query_aware else "query-agnostic",
            context_tokens=len(context_row),
            question_tokens=len(question_row),
            **footprint,
            prefill_seconds=prefill_seconds,
            decode_seconds=decode_seconds,
            generated_tokens=len(tokens),
            **end_bytes,
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
    question. ``answer_prefix`` (one for all questions, or one per question) ends each prompt
    (``chat_prompt``) and is not part of the answer.

    Returns one ``GenerationResult`` per question, greedy decoding. Bytes are measured after the
    question's prefill; ``prefill_seconds`` of the first turn includes the context prefill, later
    turns count only their question.
    """
    recipe = Recipe.parse(recipe) if isinstance(recipe, str) else recipe
    install(model)
    device = model.device
    prefixes = [answer_prefix] * len(questions) if isinstance(answer_prefix, str) else list(answer_prefix)
    splits = [
        split_prompt(tokenizer, context, question, prefix)
        for question, prefix in zip(questions, prefixes, strict=True)
    ]
    if len({head for head, _ in splits}) != 1:
        raise ValueError("the chat template frames the context differently per question")
    context_row = tokenizer.encode(splits[0][0], add_special_tokens=False)
    question_rows = [tokenizer.encode(tail, add_special_tokens=False) for _, tail in splits]
    _check_length(model, tokenizer, [context_row], question_rows, max_new_tokens)
    context_ids = torch.tensor([context_row], device=device)
    eos = eos_ids(model, tokenizer)
    mode = "query-aware" if query_aware else "query-agnostic"

    shared = CompressedCache(recipe, config=model.config)
    start = time.perf_counter()
    first_logits = None
    sees_question = query_aware and recipe.prefill_strategy().sees_question
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
                cache.crop(len(context_row) - cache.get_seq_length())
            ids = torch.tensor([question_row], device=device)
            mask = torch.ones((1, cache.get_seq_length() + ids.shape[1]), dtype=torch.long, device=device)
            with cache.settings(compress_prefill=False):
                logits = prefill(model, cache, ids, mask)
        mask = torch.ones((1, cache.get_seq_length()), dtype=torch.long, device=device)
        prefill_seconds = time.perf_counter() - start + (context_seconds if turn == 0 else 0.0)
        footprint = footprint_of(cache)
        start = time.perf_counter()
        tokens = decode(model, cache, logits, mask, eos, max_new_tokens)[0]
        results.append(
            GenerationResult(
                answer=answer_text(tokenizer, tokens, eos),
                recipe=str(recipe),
                mode=mode,
                context_tokens=len(context_row),
                question_tokens=len(question_row),
                **footprint,
                prefill_seconds=prefill_seconds,
                decode_seconds=time.perf_counter() - start,
                generated_tokens=len(tokens),
                **end_bytes_of(cache),
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
    cache = CompressedCache(recipe, config=model.config)
    start = time.perf_counter()
    ids = torch.tensor([context_ids], device=device)
    first = prefill_context(model, tokenizer, cache, ids, torch.ones_like(ids), chunk_size)
    footprint = footprint_of(cache)
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
