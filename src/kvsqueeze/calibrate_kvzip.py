"""Fit ``kvzap``'s per-layer model to KVzip's scores (``kvsqueeze calibrate --target kvzip``).

The calibration text is the prose of the docstrings of CPython's standard library
(``kvsqueeze.calibration_text``), which no eval task, filler or fidelity text uses: its paragraphs are
shuffled by the seed and packed into texts of about ``text_tokens`` tokens, the
last ``held_out`` of which are kept apart to measure the fit. Each text is prefilled as a chat
context and compressed with KVzip (its reconstruction pass); a recording KVzip scorer keeps, per
layer and KV head, the ``token_features`` of every context token but the sinks and the log of
KVzip's score. A ridge regression per (layer, KV head) maps one to the other.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvsqueeze.attention import install
from kvsqueeze.budgets.head_profile import profile_key
from kvsqueeze.cache import CompressedCache
from kvsqueeze.calibration_text import SOURCE, docstring_paragraphs
from kvsqueeze.engine import prefill_context, split_prompt
from kvsqueeze.recipe import Recipe
from kvsqueeze.scorers.base import ScoringInputs, first_valid
from kvsqueeze.scorers.kvzip import KVzip
from kvsqueeze.scorers.predictor import FEATURES_VERSION, ScorePredictor, fit_ridge, token_features

LOG_FLOOR = 1e-9
"""Smallest KVzip score whose log is fitted (a token no query attends to scores about 0)."""

Records = dict[int, list[tuple[torch.Tensor, torch.Tensor]]]
"""Per layer, per KV head, ``(features [N, F], log-scores [N])`` of one text."""


class _RecordingKVzip(KVzip):
    """KVzip that also records what ``kvzap`` sees and what KVzip scores, in ``self.records``."""

    records: Records

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        scores = super().score(inputs)
        fitted = inputs.valid & ~first_valid(inputs.valid, self.sinks)
        if inputs.protected is not None:
            fitted = fitted & ~inputs.protected
        features = token_features(inputs.keys, inputs.values).cpu()
        targets = inputs.attention_peak().amax(2).clamp(min=LOG_FLOOR).log().cpu()
        fitted = fitted.cpu()
        self.records[inputs.layer_idx] = [
            (features[:, h][fitted[:, h]], targets[:, h][fitted[:, h]]) for h in range(features.shape[1])
        ]
        return scores


def calibration_texts(
    tokenizer: PreTrainedTokenizerBase, count: int, text_tokens: int, seed: int
) -> list[str]:
    """``count`` texts of at least ``text_tokens`` tokens of whole docstring paragraphs, seeded."""
    paragraphs = list(docstring_paragraphs())
    random.Random(seed).shuffle(paragraphs)
    texts, current, size = [], [], 0
    for paragraph in paragraphs:
        current.append(paragraph)
        size += len(tokenizer.encode(paragraph, add_special_tokens=False))
        if size >= text_tokens:
            texts.append("\n\n".join(current))
            current, size = [], 0
        if len(texts) == count:
            return texts
    raise ValueError(f"the docstrings hold {len(texts)} texts of {text_tokens} tokens, not {count}")


@torch.no_grad()
def record_kvzip(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str) -> Records:
    """KVzip's features and log-scores of one text, prefilled as a chat context."""
    install(model)
    scorer = _RecordingKVzip()
    scorer.records = {}
    context, _ = split_prompt(tokenizer, text, "?")
    ids = torch.tensor([tokenizer.encode(context, add_special_tokens=False)], device=model.device)
    cache = CompressedCache(Recipe(scorer=scorer, ratio=0.5), config=model.config)
    prefill_context(model, tokenizer, cache, ids, torch.ones_like(ids))
    return scorer.records


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two ``[N]`` samples (ties broken by order)."""
    ranks = [torch.argsort(torch.argsort(x)).double() for x in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def r_squared(predicted: torch.Tensor, target: torch.Tensor) -> float:
    residual = ((target - predicted) ** 2).sum()
    return float(1 - residual / ((target - target.mean()) ** 2).sum().clamp(min=1e-12))


def fit_predictor(
    train: list[Records], held_out: list[Records], shape: tuple[int, int, int], alpha: float
) -> tuple[list, list, dict]:
    """Ridge fit per (layer, KV head) on ``train``, measured on ``held_out``.

    Returns ``(weights, bias, quality)``; ``quality`` has per-layer ``r2`` and ``spearman`` (mean
    over KV heads, None for layers KVzip never scored) and ``spearman_all``, the rank correlation
    over every (layer, head, token) of the held-out texts: what one global threshold ranks.
    """
    layers, heads, width = shape
    weights = [[[0.0] * width for _ in range(heads)] for _ in range(layers)]
    bias = [[0.0] * heads for _ in range(layers)]
    r2: list[float | None] = [None] * layers
    rho: list[float | None] = [None] * layers
    pooled_predicted, pooled_target = [], []
    for layer in sorted(set().union(*train)):
        layer_r2, layer_rho = [], []
        for head in range(heads):
            x = torch.cat([records[layer][head][0] for records in train])
            y = torch.cat([records[layer][head][1] for records in train])
            w, b = fit_ridge(x, y, alpha)
            weights[layer][head], bias[layer][head] = w.tolist(), b
            test_x = torch.cat([records[layer][head][0] for records in held_out])
            test_y = torch.cat([records[layer][head][1] for records in held_out])
            predicted = test_x @ w + b
            layer_r2.append(r_squared(predicted, test_y))
            layer_rho.append(spearman(predicted, test_y))
            pooled_predicted.append(predicted)
            pooled_target.append(test_y)
        r2[layer] = round(sum(layer_r2) / heads, 4)
        rho[layer] = round(sum(layer_rho) / heads, 4)
    quality = {
        "held_out": "per layer, mean over KV heads, on the held-out texts",
        "r2": r2,
        "spearman": rho,
        "spearman_all": round(spearman(torch.cat(pooled_predicted), torch.cat(pooled_target)), 4),
    }
    return weights, bias, quality


def calibrate_kvzip(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: int = 20,
    held_out: int = 4,
    text_tokens: int = 512,
    seed: int = 0,
    alpha: float = 1.0,
    on_text: Callable[[], None] | None = None,
) -> ScorePredictor:
    """Fit ``kvzap``'s model for ``model`` (module docstring); deterministic for a ``seed``.

    ``texts`` calibration texts, the last ``held_out`` of them for the fit quality only;
    ``on_text`` is called after each text's KVzip pass (progress bars).
    """
    if not 0 < held_out < texts:
        raise ValueError(f"held_out must be in [1, texts - 1], got {held_out} of {texts} texts")
    recorded = []
    for text in calibration_texts(tokenizer, texts, text_tokens, seed):
        recorded.append(record_kvzip(model, tokenizer, text))
        if on_text is not None:
            on_text()
    train, test = recorded[:-held_out], recorded[-held_out:]
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    weights, bias, quality = fit_predictor(
        train, test, (config.num_hidden_layers, heads, head_dim // 2 + head_dim), alpha
    )
    training = {
        "target": "log KVzip score (peak attention of the reconstruction queries, floor 1e-9)",
        "text_source": SOURCE,
        "texts": texts - held_out,
        "held_out_texts": held_out,
        "text_tokens": text_tokens,
        "tokens": _tokens(train),
        "held_out_tokens": _tokens(test),
        "seed": seed,
        "ridge_alpha": alpha,
        "features": f"key RoPE-pair norms + value, version {FEATURES_VERSION}",
    }
    name = getattr(config, "_name_or_path", "") or "model"
    return ScorePredictor(profile_key(name), weights, bias, training, quality)


def _tokens(recorded: list[Records]) -> int:
    """Context tokens fitted (the first recorded layer's first KV head: every head sees them all)."""
    return sum(len(records[min(records)][0][1]) for records in recorded)
