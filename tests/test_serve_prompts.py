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


def after(prompts: Prompts, messages: list[dict], text: str) -> list[int]:
    """Tokens the chat template puts after ``text``, the last user message's end."""
    return prompts.encode(prompts.render(messages).rpartition(text)[2])


def test_a_question_after_a_pasted_document_is_the_tail_and_the_document_is_context(tokenizer):
    prompts = Prompts(tokenizer)
    messages = chat(f"{DOCUMENT}\n\n{QUESTION}")
    context, prompt = prompts.split_chat(messages)
    assert prompt == prompts.encode(f"\n\n{QUESTION}") + after(prompts, messages, QUESTION)
    assert context + prompt == prompts.encode(prompts.render(messages))
    assert tokenizer.decode(context).endswith("Line 59: the harbour log of day 59 lists 10 ships.")
    assert tokenizer.decode(context).count("<|im_start|>") == 2 and len(context) > 600  # system, user


def test_another_question_on_the_same_document_leaves_the_same_context(tokenizer):
    prompts = Prompts(tokenizer)
    first, _ = prompts.split_chat(chat(f"{DOCUMENT}\n\n{QUESTION}"))
    second, prompt = prompts.split_chat(chat(f"{DOCUMENT}\n\nWhat did day 3 list? Answer in one word."))
    assert first == second and "day 3 list" in tokenizer.decode(prompt)


def test_without_a_short_last_paragraph_the_last_tokens_are_the_tail(tokenizer):
    prompts = Prompts(tokenizer)
    for content in (f"{DOCUMENT} {QUESTION}", f"{QUESTION}\n\n{DOCUMENT}"):
        messages = chat(content)
        context, prompt = prompts.split_chat(messages)
        assert len(prompt) == DEFAULT_PROTECT_TAIL + len(after(prompts, messages, content[-20:]))
        assert context + prompt == prompts.encode(prompts.render(messages))


def test_the_tail_counts_back_across_turns_and_a_short_chat_is_all_prompt(tokenizer):
    prompts = Prompts(tokenizer)
    context, prompt = prompts.split_chat(chat(DOCUMENT, "Noted.", "Hi"))
    assert "Line 0:" in tokenizer.decode(context) and "Noted." in tokenizer.decode(prompt)
    assert len(prompt) == DEFAULT_PROTECT_TAIL + len(after(prompts, chat("Hi"), "Hi"))
    context, prompt = prompts.split_chat(chat("Hi"))
    assert context == [] and prompt == prompts.encode(prompts.render(chat("Hi")))


@pytest.mark.parametrize("tail", [0, 5])
def test_protect_tail_bounds_the_tokens_kept_whole(tokenizer, tail):
    """A question longer than ``protect_tail`` is cut: only its last ``tail`` tokens stay whole."""
    prompts = Prompts(tokenizer, protect_tail=tail)
    assert len(prompts.encode(QUESTION)) > tail
    messages = chat(f"{DOCUMENT}\n\n{QUESTION}")
    _, prompt = prompts.split_chat(messages)
    assert len(prompt) == tail + len(after(prompts, messages, QUESTION))
    context, prompt = prompts.split_completion(f"{DOCUMENT}\n\n{QUESTION}")
    assert len(prompt) == tail and context + prompt == prompts.encode(f"{DOCUMENT}\n\n{QUESTION}")


def test_a_completion_prompt_is_cut_as_a_user_message(tokenizer):
    prompts = Prompts(tokenizer)
    context, prompt = prompts.split_completion(f"{DOCUMENT}\n\nQuestion: {QUESTION}\nAnswer:")
    assert prompt == prompts.encode(f"\n\nQuestion: {QUESTION}\nAnswer:")
    assert context == prompts.encode(DOCUMENT)
