"""Whole words: a word's tokens (a number's digits) are kept or dropped together."""

from __future__ import annotations

from dataclasses import dataclass

from kvsqueeze.units.base import Unit


@dataclass
class WholeWords(Unit):
    """Pool the ranking over whitespace-delimited words, so no word is kept in part.

    A token begins a word when its text starts with whitespace, when the token before it ended
    with whitespace, or when it is the first token; every other token continues the word before
    it (sub-word pieces, the digits of a number, ``adjective-noun`` keys). Each token then ranks
    as the best token of its word in its head, so a number that tokenizes one digit per token is
    never cut to its first digits. The cost is budget: a whole word takes as many slots as it
    has tokens.
    """

    name = "words"
    citation = (
        "kvsqueeze: semantic units kept whole, after ChunkKV (Liu et al., 2025, arXiv:2502.00299) "
        "with word boundaries instead of fixed chunks"
    )

    def starts(self, texts: list[str]) -> list[bool]:
        return [
            i == 0 or text[:1].isspace() or texts[i - 1][-1:].isspace() or not text
            for i, text in enumerate(texts)
        ]
