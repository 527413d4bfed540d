"""Stop strings: decoding ends at the first one, and the answer is cut before it."""

from __future__ import annotations

import torch
from tiny_models import padded_batch, tiny_model

from kvsqueeze.attention import install
from kvsqueeze.cache import CompressedCache
from kvsqueeze.engine import answer_text, decode, prefill, stop_check


def test_answer_is_cut_before_the_first_stop_string(tokenizer):
    tokens = tokenizer.encode("The pass key is 42.\n\nQuestion: and the next one?", add_special_tokens=False)
    assert answer_text(tokenizer, tokens, set(), ["\n"]) == "The pass key is 42."
    assert answer_text(tokenizer, tokens, set(), ["Question:", "42"]) == "The pass key is"
    assert answer_text(tokenizer, tokens, set()).endswith("next one?")


def test_stop_check_reads_the_text_of_the_answer_so_far(tokenizer):
    stopped = stop_check(tokenizer, set(), ["key is 4"], batch=1)
    head = tokenizer.encode("The pass key", add_special_tokens=False)
    rest = tokenizer.encode("The pass key is 42", add_special_tokens=False)[len(head) :]
    assert not any([stopped(0, token) for token in head])
    assert [stopped(0, token) for token in rest][-1]
    assert stop_check(tokenizer, set(), [], batch=1) is None


def answers(stopped=None) -> list[list[int]]:
    model = install(tiny_model("llama"))
    ids, mask = padded_batch([12, 9])
    cache = CompressedCache()
    with torch.no_grad():
        logits = prefill(model, cache, ids, mask)
        return decode(model, cache, logits, mask, set(), 8, stopped=stopped)


def test_decoding_ends_a_row_once_it_is_stopped_and_lets_the_others_go_on():
    free = answers()
    assert free[0][:3] != free[1][:3]
    seen: list[list[int]] = [[], []]

    def stop_row_0_after_3(row: int, token: int) -> bool:
        seen[row].append(token)
        return seen[row] == free[0][:3]

    stopped = answers(stopped=stop_row_0_after_3)
    assert stopped == [free[0][:3], free[1]]
