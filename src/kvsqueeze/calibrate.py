"""Find a model's retrieval heads with a seeded, training-free probe (``kvsqueeze calibrate``).

DuoAttention (Xiao et al., 2024) splits KV heads into retrieval heads, which need the whole
context, and streaming heads, which only need attention sinks and recent tokens; it learns the
split by optimisation. RazorAttention (Tang et al., 2024) finds the split without training, by
looking for heads that attend to earlier copies of the current token ("echo") or to the token
that followed them ("induction"). This module does the latter on a passkey task: the model is
shown a context holding a random key, then, teacher-forced, its own answer quoting the key. For
each layer and KV head, the score is the attention mass that the queries predicting the key's
tokens put on the key's tokens in the context (the largest over the query heads sharing the KV
head, averaged over the answer's tokens and the samples). Heads that copy from far away score
near 1; local and sink heads near 0. Without a tokenizer, the probe uses random token ids and
a repeated random key instead (same measure).

The resulting ``HeadProfile`` is saved as JSON under ``$KVSQUEEZE_HOME/profiles/`` and read by
the ``duo`` budget. ``--target kvzip`` fits the ``kvzap`` scorer instead (``kvsqueeze.calibrate_kvzip``).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from transformers import AttentionInterface, PreTrainedModel, PreTrainedTokenizerBase
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvsqueeze.argtypes import count
from kvsqueeze.budgets.head_profile import HeadProfile, profile_key, user_profile_path
from kvsqueeze.calibrate_kvzip import calibrate_kvzip
from kvsqueeze.models import DEFAULT_MODEL, chat_prompt, load_model
from kvsqueeze.scorers.predictor import user_predictor_path

__all__ = [
    "HeadProfile",
    "ProbeSample",
    "add_calibrate_command",
    "calibrate",
    "copy_samples",
    "head_scores",
    "passkey_samples",
    "run_calibrate",
]

PROBE_ATTENTION = "kvsqueeze_probe"
PROBE_VERSION = 1
FILLER = (
    "The grass is green. ",
    "The sky is blue. ",
    "The sun is yellow. ",
    "Here we go. ",
    "There and back again. ",
    "The river runs past the old mill. ",
    "A cat sleeps on the warm wall. ",
    "The baker opens the shop at dawn. ",
    "Rain fell on the quiet town all night. ",
    "The train leaves the station on time. ",
    "Children play in the park after school. ",
    "The library keeps its doors open late. ",
)


@dataclass
class ProbeSample:
    """One probe sequence: token ids, the rows whose next token is a key token of the answer, and
    the positions of the key's tokens in the context (the needle)."""

    input_ids: list[int]
    answer_rows: list[int]
    needle: list[int]


def passkey_samples(
    tokenizer: PreTrainedTokenizerBase, samples: int, seed: int, context_tokens: int = 768
) -> list[ProbeSample]:
    """Seeded passkey prompts (chat template, filler, a 6-digit key stated twice, the question) with
    the answer ``The pass key is KEY.`` appended, as the model would write it."""
    rng = random.Random(seed)
    marker = "\x00QUESTION\x00"
    head, tail = chat_prompt(tokenizer, marker).split(marker)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    filler = [encode(sentence) for sentence in FILLER]
    out = []
    for _ in range(samples):
        key = str(rng.randrange(100_000, 1_000_000))
        sentences: list[list[int]] = []
        while sum(map(len, sentences)) < context_tokens:
            sentences.append(filler[rng.randrange(len(filler))])
        depth = rng.randrange(1, len(sentences))
        before = [t for s in sentences[:depth] for t in s]
        after = [t for s in sentences[depth:] for t in s]
        segments = [
            (encode(head + "Remember the pass key hidden in this text.\n\n"), ""),
            (before, ""),
            (encode("The pass key is "), ""),
            (encode(key), "needle"),
            (encode(". Remember it. "), ""),
            (encode(key), "needle"),
            (encode(" is the pass key. "), ""),
            (after, ""),
            (encode("\n\nWhat is the pass key?" + tail + "The pass key is "), ""),
            (encode(key), "answer"),
            (encode("."), ""),
        ]
        out.append(_assemble(segments))
    return out


def copy_samples(vocab_size: int, samples: int, seed: int, length: int = 256, key_length: int = 8):
    """Seeded random-token sequences ``filler, key, filler, key`` (no tokenizer needed): the second
    copy of the key is the answer, the first the needle. Token ids 0..2 are left out (specials)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(samples):
        tokens = torch.randperm(vocab_size - 3, generator=generator) + 3
        key, pool = tokens[:key_length].tolist(), tokens[key_length:]
        filler = pool[torch.randint(len(pool), (length,), generator=generator)].tolist()
        depth = int(torch.randint(length // 8, length - length // 8, (1,), generator=generator))
        out.append(_assemble([(filler[:depth], ""), (key, "needle"), (filler[depth:], ""), (key, "answer")]))
    return out


def _assemble(segments: list[tuple[list[int], str]]) -> ProbeSample:
    ids: list[int] = []
    answer_rows: list[int] = []
    needle: list[int] = []
    for tokens, role in segments:
        positions = range(len(ids), len(ids) + len(tokens))
        if role == "needle":
            needle.extend(positions)
        elif role == "answer":
            answer_rows.extend(p - 1 for p in positions)
        ids.extend(tokens)
    return ProbeSample(ids, answer_rows, needle)


def _probe_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA, plus the attention mass that ``probe["rows"]`` queries put on ``probe["needle"]``."""
    probe = kwargs.pop("kvsqueeze_probe", None)
    output = sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if probe is not None:
        rows, needle = probe["rows"], probe["needle"]
        n_rep = query.shape[1] // key.shape[1]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        keys = key.float().repeat_interleave(n_rep, dim=1)
        logits = query[:, :, rows].float() @ keys.transpose(-1, -2) * scale  # [B, Hq, a, T]
        if attention_mask is not None:
            mask = attention_mask[:, :, rows]
            if mask.dtype != torch.bool:
                mask = mask > torch.finfo(mask.dtype).min / 2
        else:
            mask = torch.arange(keys.shape[2], device=rows.device) <= rows[:, None]
        probs = logits.masked_fill(~mask, -torch.inf).softmax(-1).nan_to_num(0.0)
        mass = probs[..., needle].sum(-1).mean(-1)  # [B, Hq]
        probe["mass"][module.layer_idx] = mass.reshape(mass.shape[0], -1, n_rep).amax(-1)[0]
    return output


@contextmanager
def _probing(model: PreTrainedModel) -> Iterator[None]:
    """Run ``model`` with the probe attention; the previous implementation is always restored."""
    AttentionInterface.register(PROBE_ATTENTION, _probe_attention)
    AttentionMaskInterface.register(
        PROBE_ATTENTION, lambda *a, **k: sdpa_mask(*a, **{**k, "allow_is_causal_skip": False})
    )
    previous = model.config._attn_implementation
    model.set_attn_implementation(PROBE_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def head_scores(
    model: PreTrainedModel, samples: list[ProbeSample], on_sample: Callable[[], None] | None = None
) -> torch.Tensor:
    """``[layers, kv_heads]`` mean needle mass of the answer's queries (see module docstring)."""
    config = model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    total = torch.zeros(config.num_hidden_layers, kv_heads, dtype=torch.float64)
    device = model.device
    with _probing(model):
        for sample in samples:
            probe = {
                "rows": torch.tensor(sample.answer_rows, device=device),
                "needle": torch.tensor(sample.needle, device=device),
                "mass": {},
            }
            ids = torch.tensor([sample.input_ids], device=device)
            model(input_ids=ids, use_cache=False, logits_to_keep=1, kvsqueeze_probe=probe)
            for layer, mass in probe["mass"].items():
                total[layer] += mass.double().cpu()
            if on_sample is not None:
                on_sample()
    return total / max(len(samples), 1)


def calibrate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None = None,
    samples: int = 16,
    seed: int = 0,
    context_tokens: int = 768,
    on_sample: Callable[[], None] | None = None,
) -> HeadProfile:
    """Score every KV head of ``model`` for retrieval; deterministic for a given ``seed``.

    With a tokenizer the probe is the passkey task (``passkey_samples``, ``context_tokens`` of
    filler); without, random-token copies (``copy_samples``). ``on_sample`` is called after each
    sample (progress bars).
    """
    if tokenizer is not None:
        probe_samples = passkey_samples(tokenizer, samples, seed, context_tokens)
        settings = {"kind": "passkey", "context_tokens": context_tokens}
    else:
        probe_samples = copy_samples(model.config.vocab_size, samples, seed)
        settings = {"kind": "copy", "length": 256, "key_length": 8}
    scores = head_scores(model, probe_samples, on_sample)
    settings.update(samples=samples, seed=seed, version=PROBE_VERSION, score="needle attention mass")
    name = getattr(model.config, "_name_or_path", "") or "model"
    return HeadProfile(model=profile_key(name), scores=scores.tolist(), probe=settings)


def add_calibrate_command(subparsers) -> argparse.ArgumentParser:
    """Add ``calibrate`` to a CLI's subparsers (``kvsqueeze calibrate --model M [--target kvzip]``)."""
    parser = subparsers.add_parser(
        "calibrate",
        help="fit what a recipe needs from a model: the `duo` head profile, or the `kvzap` scorer",
        description="--target duo (default): run a seeded passkey probe on MODEL and score every KV "
        "head by the attention its answer puts on the key in the context (RazorAttention-style, no "
        "training); saves the head profile as JSON under $KVSQUEEZE_HOME/profiles/ (or --out), where "
        "`duo` recipes find it. --target kvzip: run KVzip's reconstruction pass on --texts texts of "
        "the prose of the Python standard library's docstrings (no eval task's text or filler), record "
        "each layer's keys/values and KVzip's scores, and fit per (layer, KV head) a ridge regression "
        "from key/value features to the log of KVzip's score; the last --held-out texts measure the "
        "fit (R^2, rank correlation). Saves it as JSON under $KVSQUEEZE_HOME/kvzap/ (or --out), where "
        "`kvzap` recipes find it.",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"HF model id or local path (default: {DEFAULT_MODEL}, the embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--target",
        choices=("duo", "kvzip"),
        default="duo",
        help="duo: the head profile of the `duo` budget (default); kvzip: the `kvzap` scorer, fitted "
        "to KVzip's scores",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the probe prompts / text order (default 0)"
    )
    duo = parser.add_argument_group("--target duo")
    duo.add_argument("--samples", type=count(1), default=16, metavar="N", help="probe prompts (default 16)")
    duo.add_argument(
        "--context-tokens",
        type=count(1),
        default=768,
        metavar="N",
        help="filler tokens around the key in each prompt (default 768)",
    )
    kvzip = parser.add_argument_group("--target kvzip")
    kvzip.add_argument(
        "--texts",
        type=count(2),
        default=24,
        metavar="N",
        help="calibration texts, held-out ones included (default 24)",
    )
    kvzip.add_argument(
        "--held-out",
        type=count(1),
        default=4,
        metavar="N",
        help="texts kept apart to measure the fit (default 4)",
    )
    kvzip.add_argument(
        "--text-tokens",
        type=count(16),
        default=512,
        metavar="N",
        help="tokens per text, at least (default 512)",
    )
    kvzip.add_argument(
        "--ridge",
        type=float,
        default=1.0,
        metavar="ALPHA",
        help="ridge penalty on standardised features (default 1)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="where to write the result (default: the user path named above)",
    )
    parser.add_argument("--dtype", default="float32", help="model dtype (default float32)")
    return parser


def _progress(console: Console) -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=console, transient=True)


def run_calibrate(args: argparse.Namespace, console: Console | None = None) -> int:
    """Calibrate ``args.model`` for ``args.target``, save the result, print a summary. Returns
    the exit status."""
    console = console or Console()
    if args.target == "kvzip" and args.held_out >= args.texts:
        print(
            f"error: --held-out ({args.held_out}) must be fewer than --texts ({args.texts})", file=sys.stderr
        )
        return 2
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    if args.target == "kvzip":
        return _run_kvzip(args, model, tokenizer, console)
    start = time.perf_counter()
    with _progress(console) as progress:
        task = progress.add_task("probing heads", total=args.samples)
        profile = calibrate(
            model,
            tokenizer,
            samples=args.samples,
            seed=args.seed,
            context_tokens=args.context_tokens,
            on_sample=lambda: progress.advance(task),
        )
    seconds = time.perf_counter() - start
    path = profile.save(args.out or user_profile_path(model.config._name_or_path))
    table = Table(title=f"retrieval heads of {profile.model} (best 25% marked *)")
    for column in ("rank", "layer", "KV head", "score", ""):
        table.add_column(column, justify="right")
    chosen = profile.retrieval_heads(0.25)
    for rank, (layer, head, score) in enumerate(profile.ranked()[:12], start=1):
        table.add_row(str(rank), str(layer), str(head), f"{score:.3f}", "*" if chosen[layer, head] else "")
    console.print(table)
    console.print(f"{args.samples} samples in {seconds:.1f} s; profile written to {path}")
    return 0


def _run_kvzip(args: argparse.Namespace, model, tokenizer, console: Console) -> int:
    start = time.perf_counter()
    with _progress(console) as progress:
        task = progress.add_task("KVzip passes", total=args.texts)
        predictor = calibrate_kvzip(
            model,
            tokenizer,
            texts=args.texts,
            held_out=args.held_out,
            text_tokens=args.text_tokens,
            seed=args.seed,
            alpha=args.ridge,
            on_text=lambda: progress.advance(task),
        )
    seconds = time.perf_counter() - start
    path = predictor.save(args.out or user_predictor_path(model.config._name_or_path))
    quality = predictor.quality
    table = Table(title=f"kvzap fit of {predictor.model}, held-out text (mean over KV heads)")
    for column in ("layer", "R^2", "Spearman"):
        table.add_column(column, justify="right")
    for layer, (r2, rho) in enumerate(zip(quality["r2"], quality["spearman"], strict=True)):
        if r2 is not None:
            table.add_row(str(layer), f"{r2:.3f}", f"{rho:.3f}")
    console.print(table)
    training = predictor.training
    console.print(
        f"rank correlation over every layer, head and token: {quality['spearman_all']:.3f}; fitted on "
        f"{training['tokens']} tokens ({training['texts']} texts), measured on {training['held_out_tokens']} "
        f"({training['held_out_texts']} texts) in {seconds:.1f} s; written to {path}"
    )
    return 0
