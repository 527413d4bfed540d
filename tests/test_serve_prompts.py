"""Where a request's prompt is cut: everything but the protected tail is context (compressed and
reused), whatever the message layout."""

from __future__ import annotations

import pytest

from kvsqueeze.serve.prompts import DEFAULT_PROTECT_TAIL, Prompts

DOCUMENT = " ".join(f"Line {i}: the harbour log of day {i} lists {i * 7 % 13} ships." for i in range(60))
QUESTION = "Which day lists the most ships?"


def chat(*contents: str) -> list[dict]:
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": text} for i, text in enumerate(contents)]


def test_a_document_in_the_only_user_message_is_context_up_to_the_protected_tail(tokenizer):
    prompts = Prompts(tokenizer)
    messages = chat(f"{DOCUMENT}\n\n{QUESTION}")
    context, prompt = prompts.split_chat(messages)
    whole = prompts.encode(prompts.render(messages))
    assert context + prompt == whole
    header = prompts.encode(prompts.render(messages).rpartition(QUESTION)[2])
    assert len(prompt) == DEFAULT_PROTECT_TAIL + len(header)
    assert QUESTION in tokenizer.decode(prompt) and "Line 59" not in tokenizer.decode(context)
    assert "Line 0:" in tokenizer.decode(context) and len(context) > 600


def test_another_question_on_the_same_document_shares_the_whole_context(tokenizer):
    prompts = Prompts(tokenizer)
    first, _ = prompts.split_chat(chat(f"{DOCUMENT}\n\n{QUESTION}"))
    second, prompt = prompts.split_chat(chat(f"{DOCUMENT}\n\nWhat did day 3 list?"))
    assert first[:-20] == second[:-20] and len(second) > 600  # the tail moves by the questions' lengths
    assert "day 3 list" in tokenizer.decode(prompt)


def test_the_tail_counts_back_across_turns_and_a_short_chat_is_all_prompt(tokenizer):
    prompts = Prompts(tokenizer)
    context, prompt = prompts.split_chat(chat(DOCUMENT, "Noted.", "Hi"))
    assert "Line 0:" in tokenizer.decode(context) and "Noted." in tokenizer.decode(prompt)
    header = prompts.encode(prompts.render(chat("Hi")).rpartition("Hi")[2])
    assert len(prompt) == DEFAULT_PROTECT_TAIL + len(header)
    context, prompt = prompts.split_chat(chat("Hi"))
    assert context == [] and prompt == prompts.encode(prompts.render(chat("Hi")))


@pytest.mark.parametrize("tail", [0, 5])
def test_protect_tail_sets_how_many_message_tokens_stay_whole(tokenizer, tail):
    prompts = Prompts(tokenizer, protect_tail=tail)
    messages = chat(f"{DOCUMENT}\n\n{QUESTION}")
    _, prompt = prompts.split_chat(messages)
    header = prompts.encode(prompts.render(messages).rpartition(QUESTION)[2])
    assert len(prompt) == tail + len(header)
    context, prompt = prompts.split_completion(f"{DOCUMENT}\n\n{QUESTION}")
    assert len(prompt) == tail and context + prompt == prompts.encode(f"{DOCUMENT}\n\n{QUESTION}")
