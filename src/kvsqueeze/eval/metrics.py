"""Scores: RULER string match on answers, and logit fidelity against the full cache.

RULER (Hsieh et al., 2024) scores a prediction by the fraction of expected strings it contains
(``string_match_all``) or by whether it contains any (``string_match_part``), case-insensitively.
Here a match must also be a whole token: "6305" does not match inside "63055", nor "pace" inside
"space".
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch


def contains(prediction: str, expected: str) -> bool:
    """Whether ``expected`` occurs in ``prediction`` as a whole word/number, ignoring case."""
    pattern = rf"(?<![\w-]){re.escape(expected.strip())}(?![\w-])"
    return re.search(pattern, prediction, flags=re.IGNORECASE) is not None


def string_match_all(prediction: str, expected: Sequence[str]) -> float:
    """Fraction of ``expected`` strings found in ``prediction`` (1.0 = all of them)."""
    if not expected:
        return 0.0
    return sum(contains(prediction, e) for e in expected) / len(expected)


def string_match_part(prediction: str, expected: Sequence[str]) -> float:
    """1.0 if any expected string is found in ``prediction``, else 0.0."""
    return float(any(contains(prediction, e) for e in expected))


def bytes_fields(footprint: dict) -> dict:
    """The byte fields of a result line, from an ``engine.footprint_of`` (or a result with its
    fields), and how many of its ``layers`` the recipe compressed."""
    names = ("kv_bytes", "kv_bytes_full", "kv_bytes_16bit", "kv_bytes_full_16bit", "kv_dtype", "layers")
    fields = {name: footprint[name] for name in names}
    return {
        **fields,
        "compressed_layers": len(footprint["compressed_layers"]),
        "compression_ratio": 1.0 - fields["kv_bytes"] / fields["kv_bytes_full"],
    }


def fidelity(full: torch.Tensor, compressed: torch.Tensor, targets: Sequence[int]) -> dict[str, float]:
    """How close the compressed cache's next-token distributions are to the full cache's.

    Parameters
    ----------
    full, compressed : ``[n, vocab]`` logits of the same ``n`` positions under each cache.
    targets : the ``n`` tokens that actually follow (for perplexity).

    Returns
    -------
    dict with ``kl`` (mean over positions of KL(full || compressed), nats), ``top1`` (fraction of
    positions whose argmax agrees), ``ppl`` (perplexity of the targets under the compressed
    cache) and ``ppl_full`` (under the full cache).
    """
    full_logp = torch.log_softmax(full.double(), dim=-1)
    comp_logp = torch.log_softmax(compressed.double(), dim=-1)
    kl = (full_logp.exp() * (full_logp - comp_logp)).sum(-1).clamp(min=0)
    index = torch.tensor(list(targets), dtype=torch.long)[:, None]
    return {
        "kl": float(kl.mean()),
        "top1": float((full.argmax(-1) == compressed.argmax(-1)).double().mean()),
        "ppl": math.exp(float(-comp_logp.gather(-1, index).mean())),
        "ppl_full": math.exp(float(-full_logp.gather(-1, index).mean())),
    }
