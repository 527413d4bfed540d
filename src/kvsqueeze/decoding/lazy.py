"""LazyEviction: evict a token only once it is overdue against its own recurrence interval."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.components import option
from kvsqueeze.decoding.base import DecodeCompressor, observation_window
from kvsqueeze.scorers.base import NEVER_EVICT, ScoringInputs

INTERVAL_CODES = 16
"""A stored state holds ``(last + 1) * INTERVAL_CODES + code``: ``last`` is the slot of the last
decode query that attended the token, ``code`` its longest recurrence interval rounded up to a
power of two (0: none yet, ``c``: ``2 ** (c - 1)``). float32 holds it exactly for slots below
``2 ** 24 / INTERVAL_CODES - 1`` (about a million tokens); intervals saturate at ``2 ** 14``."""


def encode_recurrence(last: torch.Tensor, interval: torch.Tensor) -> torch.Tensor:
    """The float32 state of tokens last attended at slot ``last`` with longest interval
    ``interval`` (rounded up to a power of two; see ``INTERVAL_CODES``)."""
    exponent = torch.ceil(torch.log2(interval.clamp(min=1).double())).long() + 1
    code = torch.where(interval > 0, exponent.clamp(max=INTERVAL_CODES - 1), 0)
    return ((last + 1) * INTERVAL_CODES + code).float()


def decode_recurrence(state: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(last, interval)`` long tensors of a stored state; a token with state 0 (new since the
    last compression) counts as attended at its own slot, with no interval yet."""
    packed = state.long()
    code = packed % INTERVAL_CODES
    last = torch.where(packed > 0, packed // INTERVAL_CODES - 1, slots)
    return last, torch.where(code > 0, 2 ** (code - 1).clamp(min=0), 0)


def track_recurrence(
    attended: torch.Tensor, query_slots: torch.Tensor, last: torch.Tensor, interval: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one period of decode steps into each token's ``(last, interval)`` ``[B, H, L]``.

    ``attended [B, H, w, L]`` marks the steps (queries at ``query_slots [B, w]``, in order) at
    which a token was attended; each gap between two consecutive attended steps (the first one
    counted from ``last``) is a recurrence interval, and ``interval`` keeps the longest.
    """
    steps = query_slots[:, None, :, None].expand_as(attended)
    seen = torch.maximum(torch.where(attended, steps, -1), last[:, :, None])
    latest = torch.cummax(seen, dim=2).values
    before = torch.cat([last[:, :, None], latest[:, :, :-1]], dim=2)
    gaps = torch.where(attended, steps - before, 0).amax(2)
    return latest[:, :, -1], torch.maximum(interval, gaps)


@dataclass
class LazyEviction(DecodeCompressor):
    """Keep the tokens still within their own recurrence interval; drop the overdue ones first.

    A token is *attended* at a decode step when some query head of its KV head gives it more
    than ``alpha`` attention. Every period (``every`` steps, all of whose queries are read)
    updates each token's last attended step and its longest recurrence interval (the Maximum
    Recurrence Interval, MRI: the longest gap between two attended steps), which persist across
    compressions in the layer's per-token state. The ``[B, Hkv, L]`` score is the slack
    ``MRI - (now - last attended step)``: a token re-attended every 100 steps is kept for up to
    100 steps of silence although its current attention is low, while a token that has been
    silent longer than it ever was before (or was never attended: slack = minus its age) goes
    first. Tokens generated during the period just observed are kept (the lagged eviction: no
    token is evicted before one full period has observed it).

    Approximation: the state is one float32 per token, so the MRI is stored rounded up to a
    power of two (``INTERVAL_CODES``): a token may be kept up to twice its true MRI past its last
    attended step, never less. Whether a token is attended is an absolute attention threshold.

    Parameters
    ----------
    alpha : attention above which a token counts as attended at a step (1e-4, as reported for
        the authors' setting).
    """

    name = "lazy"
    citation = (
        "Zhang et al., 2025. LazyEviction: Lagged KV Eviction with Attention Pattern Observation "
        "for Efficient Long Reasoning. arXiv:2506.15969"
    )
    stateful = True

    alpha: float = option(1e-4, minimum=0, maximum=1)

    def observed_queries(self) -> int:
        return self.every

    def rank(self, inputs: ScoringInputs) -> tuple[torch.Tensor, torch.Tensor]:
        stored = inputs.previous_scores
        stored = torch.zeros_like(inputs.slots, dtype=torch.float32) if stored is None else stored
        last, interval = decode_recurrence(stored, inputs.slots)
        attended = inputs.attention().amax(2) > self.alpha
        last, interval = track_recurrence(attended, inputs.query_slots, last, interval)
        now = inputs.query_slots[:, -1, None, None]
        slack = (interval - (now - last)).float()
        return slack.masked_fill(observation_window(inputs), NEVER_EVICT), encode_recurrence(last, interval)

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        return self.rank(inputs)[0]
