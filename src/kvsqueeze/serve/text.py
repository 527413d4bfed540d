"""Incremental detokenization with stop strings: the text of each new token, in O(1) per token.

Decoding the whole answer at every step is O(T) per token (O(T^2) per answer). Here each step
decodes a short window: the tokens since the last emitted text plus a few before them (``LEAD``),
whose text is decoded too and cut off, because a token's text can depend on its neighbours
(leading spaces of SentencePiece, byte-level pieces of one UTF-8 character). A window that ends in
the middle of a character (text ending in U+FFFD) waits for the next token; after
``MAX_PENDING`` tokens without a complete character the replacement character is sent as the full
decode would show it.

Stop strings: a stop string can only start in text not yet sent, because text that could be the
start of one (a suffix equal to a prefix of a stop string) is held back.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

# tokens decoded before the new ones, for their context (then cut off)
LEAD = 4
# tokens that may wait for a complete UTF-8 character
MAX_PENDING = 8


class TextStream:
    """``push(token)`` returns the text it adds (empty while a character or a possible stop
    string is incomplete); ``flush()`` the rest at the end. ``count`` tokens were pushed (EOS
    excluded); ``stopped`` once a stop string appeared (the text ends before it)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_ids: frozenset[int], stop: list[str]):
        self.tokenizer, self.eos_ids, self.stop = tokenizer, eos_ids, stop
        self.ids: list[int] = []
        self.start = 0  # first token of the decode window
        self.read = 0  # tokens whose text was already taken
        self.held = ""  # decoded text not sent yet (it may start a stop string)
        self.stopped = False
        self.count = 0

    def push(self, token: int) -> str:
        if self.stopped or token in self.eos_ids:
            return ""
        self.count += 1
        self.ids.append(token)
        piece = self._decode_new(final=False)
        return self._release(piece) if piece else ""

    def flush(self) -> str:
        if self.stopped:
            return ""
        text, self.held = self.held + self._decode_new(final=True), ""
        cut = self._first_stop(text)
        return text if cut is None else text[:cut]

    def _decode_new(self, final: bool) -> str:
        """Text of the tokens after ``read``; "" while it ends in an incomplete character or
        changes how the tokens before it decode (for at most ``MAX_PENDING`` tokens)."""
        if self.read == len(self.ids):
            return ""
        known = self._decode(self.ids[self.start : self.read])
        text = self._decode(self.ids[self.start :])
        unsettled = text.endswith("\ufffd") or not text.startswith(known)
        if unsettled and not final and len(self.ids) - self.read < MAX_PENDING:
            return ""
        self.read = len(self.ids)
        self.start = max(self.read - LEAD, 0)
        return text[len(known) :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _release(self, piece: str) -> str:
        text = self.held + piece
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped, self.held = True, ""
            return text[:cut]
        hold = max((_overlap(text, stop) for stop in self.stop), default=0)
        self.held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def _first_stop(self, text: str) -> int | None:
        found = [at for at in (text.find(stop) for stop in self.stop) if at >= 0]
        return min(found) if found else None


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for size in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0
