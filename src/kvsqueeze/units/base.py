"""What a unit component does: group context tokens into units that are kept or dropped whole."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from kvsqueeze.components import Component


class Unit(Component):
    """Base class: ``starts`` segments token texts, ``unit_ids`` turns that into slots.

    The engine computes each context token's unit (the slot of the unit's first token) once per
    context from the tokenizer; the cache hands the unit of every candidate to the recipe, which
    pools the scorer's ranking (``pool_by_unit``) before selecting, so a unit's tokens rank (and
    are kept) together.
    """

    kind = "unit"

    def starts(self, texts: list[str]) -> list[bool]:
        """Whether each token (its text with leading whitespace kept) begins a new unit."""
        raise NotImplementedError

    def unit_ids(
        self, tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """``[B, n]`` slot of the first token of each token's unit, for the rows ``ids [B, n]``
        whose real tokens ``mask [B, n]`` marks (padding is a unit of its own)."""
        out = torch.arange(ids.shape[1], device=ids.device).repeat(ids.shape[0], 1)
        for row in range(ids.shape[0]):
            where = mask[row].nonzero().flatten().tolist()
            first = 0
            texts = token_texts(tokenizer, ids[row, where].tolist())
            for slot, begins in zip(where, self.starts(texts), strict=True):
                first = slot if begins else first
                out[row, slot] = first
        return out


def pool_by_unit(scores: torch.Tensor, units: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, H, L]`` scores where every valid candidate gets the best valid score of its unit in
    the same head (``units [B, H, L]``: unit id per candidate, ids are slots, so ``>= 0``)."""
    lowest = torch.finfo(scores.dtype).min
    ids = units.clamp(min=0)
    best = scores.new_full((*scores.shape[:2], int(ids.max()) + 1 if ids.numel() else 1), lowest)
    best.scatter_reduce_(2, ids, scores.masked_fill(~valid, lowest), reduce="amax")
    return torch.where(valid, best.gather(2, ids), scores)


def token_texts(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[str]:
    """The text each token adds to the decoded sequence, leading whitespace included.

    Decoding a token alone drops the leading space of SentencePiece pieces, so each token's text
    is what it adds after the previous one.
    """
    texts = []
    for i, token in enumerate(ids):
        before = tokenizer.decode(ids[i - 1 : i]) if i else ""
        pair = tokenizer.decode(ids[max(i - 1, 0) : i + 1])
        texts.append(pair[len(before) :] if pair.startswith(before) else tokenizer.decode([token]))
    return texts
