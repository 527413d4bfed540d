"""What every decode-time compressor has: a budget, a period, and a score over recent decode queries.

A decoding component bounds the cache while an answer is generated. The attention function keeps
each compressed layer's last ``observed_queries()`` decode queries; every ``every`` decode steps
the cache asks the component to ``rank`` the layer's held tokens against them
(``kvsqueeze.compression.compress_decoded``) and keeps the best ``target`` per KV head.

A ``stateful`` component (LazyEviction) keeps one float32 per held token across compressions: it
reads it as ``inputs.previous_scores`` (0 for tokens new since the last compression) and returns
the new value from ``rank``; it is ranked at every period, even when no head is over its target,
so that no period goes unrecorded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.components import Component, option
from kvsqueeze.scorers.base import ScoringInputs


@dataclass
class DecodeCompressor(Component):
    """Base class of the decoding components (recipe kind ``decoding``); subclasses implement
    ``score`` and may add options or change these defaults.

    Parameters
    ----------
    budget : tokens each KV head holds after a compression (a head grows by at most ``every``
        tokens between two compressions).
    keep : if > 0, hold this fraction of the tokens the budget counts instead of a fixed
        ``budget`` (``keep=0.25,frozen=true``: a quarter of what was generated so far).
    every : decode steps between two compressions.
    frozen : the prompt is never evicted during decoding and the budget counts generated tokens
        only (SCOPE's separate prefill and decode budgets); otherwise every held token competes
        and the budget counts them all.
    """

    kind = "decoding"
    stateful = False

    budget: int = option(256, minimum=1)
    keep: float = option(0.0, minimum=0, maximum=1)
    every: int = option(32, minimum=1)
    frozen: bool = option(False)

    def observed_queries(self) -> int:
        """How many of the latest decode queries ``score`` reads (the attention function keeps them)."""
        return 1

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        """``[B, Hkv, L]`` importance of the held candidates (higher = keep). ``inputs.queries``
        are the latest decode queries ``[B, Hq, w, D]``; ``inputs.budget`` is what each head keeps
        of the candidates, ``inputs.protected`` the tokens kept whatever their score."""
        raise NotImplementedError

    def rank(self, inputs: ScoringInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(ranking, state)``: what ``compress_decoded`` selects with and, for a ``stateful``
        component, the ``[B, Hkv, L]`` float32 state to store per token (None otherwise)."""
        return self.score(inputs), None

    def most_held(self, prompt_held: int, prompt_tokens: int, generated: int) -> int:
        """Upper bound on the tokens a head holds over ``generated`` decode steps, given it held
        ``prompt_held`` of the ``prompt_tokens`` fed before decoding (what admission reserves)."""
        if self.frozen:
            cap = int(self.target(torch.tensor([generated]))) + self.every
            return prompt_held + min(generated, cap)
        cap = int(self.target(torch.tensor([prompt_tokens + generated]))) + self.every
        return min(prompt_held + generated, max(prompt_held + min(generated, self.every), cap))

    def target(self, budgeted_tokens: torch.Tensor) -> torch.Tensor:
        """``[B]`` candidates each head of a row keeps, given the ``[B]`` tokens the budget counts."""
        if self.keep > 0:
            return torch.ceil(self.keep * budgeted_tokens.double()).long().clamp(min=1)
        return torch.full_like(budgeted_tokens, self.budget)


def observation_window(inputs: ScoringInputs) -> torch.Tensor:
    """``[B, Hkv, L]`` bool: the held tokens whose decode queries ``inputs`` holds (from the first
    observed query's slot on), the recent window R-KV, MorphKV and LazyEviction keep whole."""
    return inputs.valid & (inputs.slots >= inputs.query_slots[:, None, :1])
