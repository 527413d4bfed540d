"""RULER-style long-context tasks, generated offline and seeded (no downloads).

Conventions follow the RULER paper (Hsieh et al., 2024, "RULER: What's the Real Context Size of
Your Long-Context Language Models?", arXiv:2404.06654): needles "One of the special magic
{numbers} for {key} is: {value}." with adjective-noun keys; a haystack of repeated noise
("The grass is green. ...") or essay prose; 7-digit numbers, words or UUIDs as values; variable
tracking chains "VAR X = VAR Y"; common-words extraction from a numbered list; frequent coded
words drawn from a Zipf (zeta, alpha = 2) distribution. ``passkey`` is the pass-key retrieval of
Mohtashami & Jaggi, 2023 (arXiv:2305.16300). ``multiturn`` is SCBench-style (Li et al., 2024,
arXiv:2412.10319): one shared context, several different questions against the same cache.

Every sample is a function of ``(seed, task, length, index)`` only. ``length`` is the prompt
length in tokens of the model's tokenizer (chat template + context + first question + answer
prefix); the haystack is sized by binary search to the largest size that fits.
"""

from __future__ import annotations

import functools
import random
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from kvsqueeze.engine import split_prompt
from kvsqueeze.eval import text

# needle depths cycled by sample index (independent of the number of samples, so runs extend)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


class TaskError(ValueError):
    """Unknown task or suite name, or a length the task cannot be built at."""


@dataclass(frozen=True)
class Sample:
    """One generated prompt and what a correct answer must contain.

    ``questions`` has one entry, or several for ``multiturn`` (asked one after the other against
    the same compressed context); ``answers[i]`` lists the strings answer ``i`` must contain.
    """

    task: str
    length: int
    index: int
    context: str
    questions: tuple[str, ...]
    answers: tuple[tuple[str, ...], ...]
    answer_prefix: str | tuple[str, ...] = ""  # one for every question, or one per question
    max_new_tokens: int = 32
    depth: float | None = None
    prompt_tokens: int = 0
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Draft:
    """What a builder returns for a haystack of a given size."""

    context: str
    questions: tuple[str, ...]
    answers: tuple[tuple[str, ...], ...]
    answer_prefix: str | tuple[str, ...] = ""
    depth: float | None = None
    info: dict = field(default_factory=dict)


Builder = Callable[[random.Random, int, int, int], _Draft]  # (rng, haystack units, index, length)


# ---------------------------------------------------------------- values, keys, haystacks
def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _key(rng: random.Random) -> str:
    return f"{rng.choice(text.adjectives())}-{rng.choice(text.nouns())}"


def _value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return _number(rng)
    if kind == "words":
        return _key(rng)
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _distinct(rng: random.Random, make: Callable[[random.Random], str], count: int) -> list[str]:
    seen: list[str] = []
    while len(seen) < count:
        if (value := make(rng)) not in seen:
            seen.append(value)
    return seen


def _haystack(rng: random.Random, kind: str, units: int) -> list[str]:
    """``units`` pieces of filler: noise sentences, or words of prose from a seeded offset."""
    if kind == "noise":
        noise = text.noise_sentences()
        return [noise[i % len(noise)] for i in range(units)]
    words = text.prose_words()
    start = rng.randrange(len(words))
    return [words[(start + i) % len(words)] for i in range(units)]


def _insert(pieces: list[str], needles: list[str], positions: list[int]) -> str:
    """Insert ``needles`` before ``pieces[position]``, moved forward to the next sentence start."""
    out = list(pieces)
    starts = [0] + [i + 1 for i, piece in enumerate(pieces) if piece.endswith((".", "!", "?"))]
    if starts[-1] != len(pieces):
        starts.append(len(pieces))
    snapped = [min((s for s in starts if s >= p), default=len(pieces)) for p in positions]
    # later needles first, so needles sharing a position keep their given order
    order = sorted(range(len(needles)), key=lambda i: (snapped[i], i), reverse=True)
    for i in order:
        out.insert(snapped[i], needles[i])
    return " ".join(out)


def _at_depth(units: int, depth: float) -> int:
    return round(depth * units)


def _needle(kind: str, key: str, value: str) -> str:
    return f"One of the special magic {kind} for {key} is: {value}."


def _singular(kind: str) -> str:
    return {"numbers": "number", "words": "word", "uuids": "uuid"}[kind]


# ---------------------------------------------------------------- builders
def _passkey(rng: random.Random, units: int, index: int, length: int) -> _Draft:
    key = _number(rng, 5)
    depth = DEPTHS[index % len(DEPTHS)]
    intro = (
        "There is an important piece of information hidden inside a lot of irrelevant text. "
        "Find it and memorize it; I will ask you about it afterwards.\n\n"
    )
    context = _insert(
        _haystack(rng, "noise", units), [f"The pass key is {key}. Remember it."], [_at_depth(units, depth)]
    )
    return _Draft(intro + context, ("What is the pass key?",), ((key,),), "The pass key is", depth)


_SINGLE_VARIANTS = (("noise", "numbers"), ("essay", "words"), ("essay", "uuids"))


def _niah_single(rng: random.Random, units: int, index: int, length: int) -> _Draft:
    haystack, kind = _SINGLE_VARIANTS[index % len(_SINGLE_VARIANTS)]
    depth = DEPTHS[index % len(DEPTHS)]
    key, value = _key(rng), _value(rng, kind)
    one = _singular(kind)
    intro = (
        f"A special magic {one} is hidden in the text below. Memorize it: "
        f"I will ask you for the {one} afterwards.\n"
    )
    context = _insert(_haystack(rng, haystack, units), [_needle(kind, key, value)], [_at_depth(units, depth)])
    question = f"What is the special magic {one} for {key} mentioned in the provided text?"
    prefix = f"The special magic {one} for {key} mentioned in the provided text is"
    return _Draft(
        intro + context, (question,), ((value,),), prefix, depth, {"haystack": haystack, "value": kind}
    )


def _multi_needle(
    rng: random.Random, units: int, keys: int, values: int, asked: int, haystack: str = "essay"
) -> tuple[str, list[str], list[list[str]], list[int]]:
    """Context with ``keys`` keys of ``values`` number needles each; which keys are asked."""
    names = _distinct(rng, _key, keys)
    numbers = _distinct(rng, _number, keys * values)
    table = [numbers[k * values : (k + 1) * values] for k in range(keys)]
    needles = [_needle("numbers", names[k], v) for k in range(keys) for v in table[k]]
    rng.shuffle(needles)
    positions = [rng.randint(0, units) for _ in needles]
    intro = (
        "Some special magic numbers are hidden in the text below. Memorize them: "
        "I will ask you about them afterwards.\n"
    )
    context = intro + _insert(_haystack(rng, haystack, units), needles, positions)
    chosen = rng.sample(range(keys), asked)
    return context, [names[k] for k in chosen], [table[k] for k in chosen], chosen


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


def _niah_multikey(rng: random.Random, units: int, index: int, length: int) -> _Draft:
    context, keys, values, _ = _multi_needle(rng, units, keys=4, values=1, asked=1)
    question = f"What is the special magic number for {keys[0]} mentioned in the provided text?"
    prefix = f"The special magic number for {keys[0]} mentioned in the provided text is"
    return _Draft(context, (question,), (tuple(values[0]),), prefix)


def _niah_multivalue(rng: random.Random, units: int, index: int, length: int) -> _Draft:
    context, keys, values, _ = _multi_needle(rng, units, keys=1, values=4, asked=1)
    question = f"What are all the special magic numbers for {keys[0]} mentioned in the provided text?"
    prefix = f"The special magic numbers for {keys[0]} mentioned in the provided text are"
    return _Draft(context, (question,), (tuple(values[0]),), prefix)


def _niah_multiquery(rng: random.Random, units: int, index: int, length: int) -> _Draft:
    context, keys, values, _ = _multi_needle(rng, units, keys=4, values=1, asked=4)
    question = f"What are all the special magic numbers for {_and(keys)} mentioned in the provided text?"
    prefix = f"The special magic numbers for {_and(keys)} mentioned in the provided text are"
    return _Draft(context, (question,), (tuple(v[0] for v in values),), prefix)


def _multiturn(rng: random.Random, units: int, index: int, length: int) -> _Draft:
    context, keys, values, _ = _multi_needle(rng, units, keys=4, values=1, asked=4, haystack="noise")
    questions = tuple(
        f"What is the special magic number for {k} mentioned in the provided text?" for k in keys
    )
    prefixes = tuple(f"The special magic number for {k} mentioned in the provided text is" for k in keys)
    return _Draft(
        context, questions, tuple((v[0],) for v in values), prefixes, None, {"turns": len(questions)}
    )


def _vt(rng: random.Random, units: int, index: int, length: int, hops: int = 4) -> _Draft:
    names = _distinct(rng, lambda r: "".join(r.choices(string.ascii_uppercase, k=5)), hops + 1)
    value = _number(rng, 5)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    positions = sorted(rng.randint(0, units) for _ in chain)
    intro = "Memorize and track the chain of variable assignments hidden in the following text.\n\n"
    context = intro + _insert(_haystack(rng, "noise", units), chain, positions)
    question = f"Question: Find all variables that are assigned the value {value} in the text above."
    prefix = (
        f"Answer: According to the chain of variable assignments in the text above, {hops + 1} "
        f"variables are assigned the value {value}, they are:"
    )
    return _Draft(context, (question,), (tuple(names),), prefix)


def _cwe(rng: random.Random, units: int, index: int, length: int, top: int = 10) -> _Draft:
    # RULER repeats the common words 6 times (the rest once) below 4k tokens, 30 times (3) above
    common_repeats, rare_repeats = (6, 1) if length < 4096 else (30, 3)
    words = rng.sample(text.common_words(), top + units)
    common, rare = words[:top], words[top:]
    listed = common * common_repeats + rare * rare_repeats
    rng.shuffle(listed)
    numbered = " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed))
    context = (
        "Below is a numbered list of words. Some of them appear more often than others. "
        f"Memorize the ones that appear most often.\n{numbered}"
    )
    question = f"Question: What are the {top} most common words in the above list?"
    prefix = f"Answer: The top {top} words that appear most often in the list are:"
    return _Draft(context, (question,), (tuple(common),), prefix)


def _fwe(rng: random.Random, units: int, index: int, length: int, alpha: float = 2.0) -> _Draft:
    # ``units`` is the number of words; the vocabulary size follows RULER (length / 50)
    size = max(8, length // 50)
    vocab = _distinct(rng, lambda r: "".join(r.choices(string.ascii_lowercase, k=6)), size)
    vocab[0] = "...."  # the most frequent "word" is noise, as in RULER
    zeta = sum(k**-alpha for k in range(1, size + 1))  # normalised over the vocabulary
    counts = [int(units * k**-alpha / zeta) for k in range(1, size + 1)]
    listed = [w for w, c in zip(vocab, counts, strict=True) for _ in range(c)]
    rng.shuffle(listed)
    context = (
        "Read the following coded text and track the frequency of each coded word. Find the three "
        f"most frequently appearing coded words. {' '.join(listed)}"
    )
    question = (
        "Question: Do not provide any explanation. Please ignore the dots '....'. What are the three "
        "most frequently appearing words in the above coded text?"
    )
    prefix = "Answer: According to the coded text above, the three most frequently appearing words are:"
    return _Draft(context, (question,), (tuple(vocab[1:4]),), prefix)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    builder: Builder
    description: str
    max_new_tokens: int = 32
    min_units: int = 1
    needle: bool = False  # single needle at a chosen depth (depth x length heatmap)


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("passkey", _passkey, "pass key in repeated noise", 12, needle=True),
        TaskSpec("niah_single", _niah_single, "one needle; number/word/uuid value", 32, needle=True),
        TaskSpec("niah_multikey", _niah_multikey, "one of 4 keys asked, 3 distractor needles", 24),
        TaskSpec("niah_multivalue", _niah_multivalue, "all 4 values of one key", 48),
        TaskSpec("niah_multiquery", _niah_multiquery, "4 keys asked at once", 64),
        TaskSpec("vt", _vt, "variable tracking: 1 chain, 4 hops", 32),
        TaskSpec("cwe", _cwe, "10 most common words of a numbered list", 96, min_units=5),
        TaskSpec("fwe", _fwe, "3 most frequent coded words (zeta, alpha=2)", 40, min_units=100),
        TaskSpec("multiturn", _multiturn, "4 questions against one compressed context", 12),
    )
}
# "default": the tasks on which the full cache of the default model scores high at the default
# length (measured; see the README's Evaluation section), so losses come from compression
SUITES: dict[str, tuple[str, ...]] = {
    "ruler-lite": tuple(TASKS),
    "default": ("passkey", "niah_multikey", "multiturn"),
    "longgen": ("longgen_fidelity", "longgen_recall", "longgen_count"),
}
DEFAULT_SUITE = "default"
DEFAULT_LENGTHS = (1024,)
FIDELITY = "fidelity"  # not an answer task: logit fidelity on held prose (see ``fidelity_tokens``)
# long answers, run by ``kvsqueeze.eval.longgen`` (name -> what it measures)
LONG_GENERATION = {
    "longgen_fidelity": "KL and top-1 vs full per 256 tokens of a long teacher-forced continuation",
    "longgen_recall": "the pass key asked after a long answer",
    "longgen_count": "count by a step for a whole long answer, scored by rule",
}


def resolve_tasks(names: str | list[str]) -> list[str]:
    """Expand a comma-separated list of task and suite names; raise ``TaskError`` when unknown."""
    items = names.split(",") if isinstance(names, str) else names
    out: list[str] = []
    for item in (i.strip() for i in items):
        expanded = SUITES.get(item, (item,))
        for name in expanded:
            if name not in TASKS and name != FIDELITY and name not in LONG_GENERATION:
                valid = ", ".join([*TASKS, FIDELITY, *LONG_GENERATION, *SUITES])
                raise TaskError(f"unknown task {name!r}; valid: {valid}")
            if name not in out:
                out.append(name)
    return out


def parse_length(token: str) -> int:
    """``"1k"`` -> 1024, ``"512"`` -> 512, ``"1.5k"`` -> 1536; raise ``TaskError`` otherwise."""
    raw = token.strip().lower()
    scale = 1024 if raw.endswith("k") else 1
    try:
        value = float(raw[:-1] if scale > 1 else raw) * scale
    except ValueError:
        raise TaskError(f"bad length {token!r}: use a token count such as 512, 1k or 1.5k") from None
    if value < 64 or value != int(value):
        raise TaskError(f"bad length {token!r}: needs a whole number of tokens >= 64")
    return int(value)


def sample_seed(seed: int, task: str, length: int, index: int) -> str:
    """The seed string of one sample (``random.Random`` hashes strings stably across runs)."""
    return f"{seed}:{task}:{length}:{index}"


def make_sample(
    tokenizer: PreTrainedTokenizerBase, task: str, length: int, index: int, seed: int = 0
) -> Sample:
    """Generate sample ``index`` of ``task`` whose prompt is as close to ``length`` tokens as fits."""
    spec = TASKS[task]
    key = sample_seed(seed, task, length, index)

    def build(units: int) -> tuple[_Draft, int]:
        draft = spec.builder(random.Random(key), units, index, length)
        prefix = draft.answer_prefix if isinstance(draft.answer_prefix, str) else draft.answer_prefix[0]
        return draft, prompt_tokens(tokenizer, draft.context, draft.questions[0], prefix)

    low, high = spec.min_units, spec.min_units
    best = None
    while (attempt := build(high))[1] <= length:
        best, low, high = attempt, high, high * 2
    while high - low > 1:  # invariant: build(low) fits (or low is the minimum), build(high) does not
        middle = (low + high) // 2
        if (attempt := build(middle))[1] <= length:
            best, low = attempt, middle
        else:
            high = middle
    if best is None:
        raise TaskError(f"{task} cannot be built in {length} tokens; its smallest prompt is longer")
    draft, tokens = best
    return Sample(
        task=task,
        length=length,
        index=index,
        context=draft.context,
        questions=draft.questions,
        answers=draft.answers,
        answer_prefix=draft.answer_prefix,
        max_new_tokens=spec.max_new_tokens,
        depth=draft.depth,
        prompt_tokens=tokens,
        info=draft.info,
    )


def prompt_tokens(tokenizer: PreTrainedTokenizerBase, context: str, question: str, answer_prefix: str) -> int:
    """Tokens the model is fed for this prompt (chat template included)."""
    head, tail = split_prompt(tokenizer, context, question, answer_prefix)
    return len(tokenizer.encode(head + tail, add_special_tokens=False))


@functools.cache
def _prose_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    return tuple(tokenizer.encode("\n\n".join(text.prose_paragraphs()), add_special_tokens=False))


def fidelity_tokens(
    tokenizer: PreTrainedTokenizerBase, length: int, index: int, seed: int = 0, continuation: int = 128
) -> tuple[list[int], list[int]]:
    """A ``length``-token prefix of English prose and the ``continuation`` tokens that follow it.

    The window starts at a seeded offset in ``text.prose_paragraphs()``; raises ``TaskError`` when
    the prose is shorter than ``length + continuation`` tokens.
    """
    ids = _prose_ids(tokenizer)
    need = length + continuation
    if need > len(ids):
        raise TaskError(
            f"fidelity needs {need} tokens of prose but {text.PROSE_SOURCE} has {len(ids)}; "
            "use a shorter length"
        )
    start = random.Random(sample_seed(seed, FIDELITY, length, index)).randrange(len(ids) - need + 1)
    return list(ids[start : start + length]), list(ids[start + length : start + need])
