"""Incremental detokenization (the real tokenizer): what is streamed is what the full decode says,
each step decodes a bounded window, stop strings end the text."""

from __future__ import annotations

import pytest

from kvsqueeze.serve.text import LEAD, MAX_PENDING, TextStream

TEXT = "Größe: 42 €, naïve café — 東京タワー 🗼🎉 done.\nNext line: ünïcödé ok"


def streamed(tokenizer, ids, stop=(), eos=frozenset()):
    text = TextStream(tokenizer, frozenset(eos), list(stop))
    pieces = [text.push(token) for token in ids]
    return pieces, text.flush(), text


def test_the_streamed_text_equals_the_full_decode_with_characters_split_across_tokens(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    split = [t for t in ids if "\ufffd" in tokenizer.decode([t])]
    assert len(split) >= 4  # multi-byte characters really are split across tokens here
    pieces, rest, text = streamed(tokenizer, ids)
    assert "".join(pieces) + rest == tokenizer.decode(ids, skip_special_tokens=True) == TEXT
    assert not any("\ufffd" in piece for piece in pieces)
    assert text.count == len(ids)


def test_each_step_decodes_a_bounded_window_not_the_whole_answer(tokenizer, monkeypatch):
    ids = tokenizer.encode(TEXT * 20, add_special_tokens=False)
    decoded = []
    decode = tokenizer.decode

    def recording(token_ids, **kwargs):
        decoded.append(len(token_ids))
        return decode(token_ids, **kwargs)

    monkeypatch.setattr(tokenizer, "decode", recording)
    pieces, rest, _ = streamed(tokenizer, ids)
    monkeypatch.undo()
    assert "".join(pieces) + rest == tokenizer.decode(ids)
    assert len(ids) > 500 and max(decoded) <= LEAD + MAX_PENDING
    assert sum(decoded) < 2 * (LEAD + MAX_PENDING) * len(ids)  # O(T), not O(T^2)


@pytest.mark.parametrize("stop", ["café", "🗼", "Next line"])
def test_a_stop_string_ends_the_text_before_it_even_across_tokens(tokenizer, stop):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    pieces, rest, text = streamed(tokenizer, ids, stop=[stop, "never appears"])
    assert text.stopped and rest == ""
    assert "".join(pieces) == TEXT[: TEXT.index(stop)]


def test_eos_and_special_tokens_add_no_text(tokenizer):
    ids = tokenizer.encode("Hello there", add_special_tokens=False)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pieces, rest, text = streamed(tokenizer, [*ids, eos], eos={eos})
    assert "".join(pieces) + rest == "Hello there" and text.count == len(ids)
