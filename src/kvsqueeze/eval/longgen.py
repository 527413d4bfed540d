"""Long-generation tasks: what a cache compressed *during decoding* keeps over a long answer.

Three tasks, offline and seeded like the others (``(seed, task, length, index)`` fixes a sample):

- ``longgen_fidelity``: a ``length``-token window of English prose; the full cache continues it
  greedily for ``tokens`` tokens (eos excluded, so every sample is that long); every other recipe
  is teacher-forced on that continuation, one decode step per token, so its decoding component
  compresses on its own period. KL(full ‖ recipe) and top-1 agreement per 256-token segment show
  where it drifts.
- ``longgen_recall``: a ``passkey`` context, then a long stretch of answer (the full cache's greedy
  reply, eos excluded, teacher-forced for every recipe), then the pass-key question in a second
  turn: does decode-time compression keep what the prompt said?
- ``longgen_count``: "count upward from S in steps of k, one number per line", the first three
  lines given; each recipe generates its own answer and is scored by rule: the fraction of the
  lines due within ``tokens`` tokens that are right, in order, before the first wrong one — a long
  answer that must keep a rule the whole way, as LongGenBench's (Liu et al., 2024,
  arXiv:2409.02076) long outputs with constraints.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvsqueeze.attention import install
from kvsqueeze.cache import CompressedCache
from kvsqueeze.engine import (
    DecodeTrace,
    answer_text,
    decode,
    decode_trace,
    end_bytes_of,
    eos_ids,
    footprint_of,
    prefill_context,
)
from kvsqueeze.eval.metrics import bytes_fields, fidelity, string_match_all
from kvsqueeze.eval.tasks import LONG_GENERATION, fidelity_tokens, make_sample, sample_seed
from kvsqueeze.models import chat_prompt, completion_prompt
from kvsqueeze.prefill import prefill
from kvsqueeze.recipe import Recipe

LONGGEN_FIDELITY, LONGGEN_RECALL, LONGGEN_COUNT = LONG_GENERATION
SEGMENT = 256
STRETCH_REQUEST = "Before that, write a numbered list of one hundred animals, one per line."
RECALL_ANSWER_TOKENS = 12
_TURN_MARK = "\x00answer\x00"


def two_turn_prompt(
    tokenizer: PreTrainedTokenizerBase, first: str, second: str, answer_prefix: str = ""
) -> tuple[str, str]:
    """The text before the first answer and the text from its end to where the second answer
    starts, ``answer_prefix`` included (the chat template's turns, or a base model's two
    completion turns with one BOS at the start, as ``chat_prompt`` frames one)."""
    if not tokenizer.chat_template:
        return chat_prompt(tokenizer, first), f"\n\n{completion_prompt(second, answer_prefix)}"
    messages = [
        {"role": "user", "content": first},
        {"role": "assistant", "content": _TURN_MARK},
        {"role": "user", "content": second},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head, _, tail = text.partition(_TURN_MARK)
    return head, tail + answer_prefix


def count_lines(start: int, step: int, lines: int) -> list[str]:
    return [str(start + i * step) for i in range(lines)]


def count_score(answer: str, expected: list[str]) -> float:
    """Fraction of ``expected`` lines the answer has right, in order, before its first wrong line."""
    got = answer.strip().splitlines()
    right = 0
    for want, line in zip(expected, got, strict=False):
        if line.strip() != want:
            break
        right += 1
    return right / len(expected)


def segment_metrics(full: DecodeTrace, other: DecodeTrace) -> list[dict]:
    """Per ``SEGMENT`` tokens of the answer: KL(full ‖ other), top-1 agreement, and the bytes
    ``other`` held at the segment's end."""
    out = []
    for begin in range(0, len(full.tokens), SEGMENT):
        end = min(begin + SEGMENT, len(full.tokens))
        metrics = fidelity(full.logits[begin:end], other.logits[begin:end], full.tokens[begin:end])
        out.append(
            {"end": end, "kl": metrics["kl"], "top1": metrics["top1"], "kv_bytes": other.kv_bytes[end - 1]}
        )
    return out


@dataclass
class _Prefilled:
    cache: CompressedCache
    logits: torch.Tensor
    mask: torch.Tensor
    seconds: float


class _LongRun:
    """One sample of a long-generation task, run by each recipe in turn (full first)."""

    def __init__(
        self, config, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task, length, index
    ):
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.length, self.index = length, index
        self.steps = config.longgen_tokens
        self.eos = eos_ids(model, tokenizer)
        install(model)

    def _prefill(self, recipe: str, ids: list[int]) -> _Prefilled:
        cache = CompressedCache(Recipe.parse(recipe), config=self.model.config)
        tensor = torch.tensor([ids], device=self.model.device)
        start = time.perf_counter()
        logits = prefill_context(
            self.model, self.tokenizer, cache, tensor, torch.ones_like(tensor), self.config.chunk_size
        )
        return _Prefilled(cache, logits, torch.ones_like(tensor), time.perf_counter() - start)

    def _record(
        self, prefilled: _Prefilled, generated: int, seconds: float, prompt: int, score: float
    ) -> dict:
        """The fields every long-generation line has; bytes are what the cache holds at the end
        (``kv_bytes_full``: what the full cache would hold for the same tokens)."""
        return {
            "prompt_tokens": prompt,
            "context_tokens": prompt,
            "generated_tokens": generated,
            "score": score,
            **bytes_fields(footprint_of(prefilled.cache)),
            **end_bytes_of(prefilled.cache),
            "ms_per_token": 1000 * seconds / max(generated, 1),
            "prefill_seconds": prefilled.seconds,
            "decode_seconds": seconds,
        }


class LongFidelityRun(_LongRun):
    """``longgen_fidelity``: the full cache's continuation is kept for the teacher-forced recipes."""

    def __init__(self, *args):
        super().__init__(*args)
        self.context, _ = fidelity_tokens(
            self.tokenizer, self.length, self.index, self.config.seed, continuation=0
        )
        self.full: DecodeTrace | None = None

    def run(self, recipe: str) -> dict:
        prefilled = self._prefill(recipe, self.context)
        forced = None if self.full is None else self.full.tokens
        trace = decode_trace(
            self.model, prefilled.cache, prefilled.logits, prefilled.mask, self.steps, forced, self.eos
        )
        if self.full is None:
            self.full = trace
        segments = segment_metrics(self.full, trace)
        overall = fidelity(self.full.logits, trace.logits, self.full.tokens)
        return {
            **self._record(prefilled, len(trace.tokens), trace.seconds, len(self.context), overall["top1"]),
            "kl": overall["kl"],
            "top1": overall["top1"],
            "segments": segments,
        }


class LongRecallRun(_LongRun):
    """``longgen_recall``: prompt with a pass key, a long teacher-forced stretch, then the question."""

    def __init__(self, *args):
        super().__init__(*args)
        sample = make_sample(self.tokenizer, "passkey", self.length, self.index, self.config.seed)
        head, between = two_turn_prompt(
            self.tokenizer,
            f"{sample.context}\n\n{STRETCH_REQUEST}",
            sample.questions[0],
            sample.answer_prefix,
        )
        self.prompt = self.tokenizer.encode(head, add_special_tokens=False)
        self.question = self.tokenizer.encode(between, add_special_tokens=False)
        self.answers = list(sample.answers[0])
        self.depth = sample.depth
        self.stretch: list[int] | None = None

    def run(self, recipe: str) -> dict:
        prefilled = self._prefill(recipe, self.prompt)
        cache = prefilled.cache
        trace = decode_trace(
            self.model, cache, prefilled.logits, prefilled.mask, self.steps, self.stretch, self.eos
        )
        if self.stretch is None:
            self.stretch = trace.tokens
        question = torch.tensor([self.question], device=self.model.device)
        mask = torch.cat([trace.mask, torch.ones_like(question)], dim=1)
        with cache.settings(compress_prefill=False):
            logits = prefill(self.model, cache, question, mask)
        answer = decode(self.model, cache, logits, mask, self.eos, RECALL_ANSWER_TOKENS)[0]
        prediction = answer_text(self.tokenizer, answer, self.eos)
        score = string_match_all(prediction, self.answers)
        return {
            **self._record(prefilled, len(trace.tokens), trace.seconds, len(self.prompt), score),
            "depth": self.depth,
            "prediction": prediction,
            "answers": self.answers,
        }


class LongCountRun(_LongRun):
    """``longgen_count``: each recipe writes its own answer, scored by the counting rule."""

    def __init__(self, *args):
        super().__init__(*args)
        rng = random.Random(sample_seed(self.config.seed, LONGGEN_COUNT, self.length, self.index))
        self.start, self.step = rng.randint(1000, 8999), rng.choice((1, 2, 3, 5, 7, 10, 25))
        given = 3
        question = f"Count upward from {self.start} in steps of {self.step}, one number per line."
        prefix = "".join(f"{line}\n" for line in count_lines(self.start, self.step, given))
        prompt = chat_prompt(self.tokenizer, question, prefix)
        self.prompt = self.tokenizer.encode(prompt, add_special_tokens=False)
        self.expected = self._due(given)

    def _due(self, given: int) -> list[str]:
        """The lines after the given ones that fit in ``steps`` tokens of a correct answer."""
        lines = count_lines(self.start + given * self.step, self.step, self.steps)
        ids = self.tokenizer.encode("\n".join(lines) + "\n", add_special_tokens=False)[: self.steps]
        whole = self.tokenizer.decode(ids).split("\n")[:-1]  # the last piece may be cut
        return whole or lines[:1]

    def run(self, recipe: str) -> dict:
        prefilled = self._prefill(recipe, self.prompt)
        start = time.perf_counter()
        tokens = decode(self.model, prefilled.cache, prefilled.logits, prefilled.mask, self.eos, self.steps)[
            0
        ]
        seconds = time.perf_counter() - start
        answer = answer_text(self.tokenizer, tokens, self.eos)
        return {
            **self._record(
                prefilled, len(tokens), seconds, len(self.prompt), count_score(answer, self.expected)
            ),
            "info": {"start": self.start, "step": self.step, "lines_due": len(self.expected)},
            "prediction": answer[:2000],
        }


RUNS = {LONGGEN_FIDELITY: LongFidelityRun, LONGGEN_RECALL: LongRecallRun, LONGGEN_COUNT: LongCountRun}
