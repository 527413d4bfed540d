"""How a request's messages become tokens, and where compression stops.

The whole prompt is one token sequence: every message, a document pasted into the last user
message included, up to the protected tail of that message. That part is the *context*: the
recipe compresses it chunk by chunk and prefix reuse matches it, whatever the message layout. The
rest, the *prompt*, is never compressed: the protected tail and what the chat template puts after
it (the end of the turn and the assistant's header). The protected tail is the message's last
paragraph (from its last blank line on) when that paragraph has at most ``protect_tail`` tokens --
a question after a document, so that any short question on the same document leaves the same
context, which prefix reuse then finds whole -- and otherwise its last ``protect_tail`` tokens.
Compressing the context without its question is query-agnostic compression; the question's
tokens still see the whole compressed context.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

DEFAULT_PROTECT_TAIL = 64
"""Most tokens at the end of the last user message that are never compressed."""

PARAGRAPH_BREAK = "\n\n"

DOCUMENT = "\x00kvsqueeze-document\x00"
"""Stands for a message's text while a chat is rendered, to find where that text goes."""


class Prompts:
    """Render and tokenize chats and completions for one tokenizer (see module docstring)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, protect_tail: int = DEFAULT_PROTECT_TAIL):
        self.tokenizer = tokenizer
        self.protect_tail = protect_tail

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def render(self, messages: list[dict]) -> str:
        """The chat template's prompt for ``messages`` (the server refuses chats for a model
        without one)."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def document_head(self, messages_before: list[dict]) -> str:
        """Rendered text before a document placed at the start of the first user message."""
        text = self.render([*messages_before, {"role": "user", "content": DOCUMENT}])
        return text[: text.index(DOCUMENT)]

    def after_document(self, messages: list[dict], first: int) -> list[int]:
        """Prompt tokens of a chat whose document (a stored context) is placed at the start of
        the user message ``messages[first]``: everything after the document."""
        marked = [
            *messages[:first],
            {**messages[first], "content": DOCUMENT + "\n\n" + messages[first]["content"]},
            *messages[first + 1 :],
        ]
        text = self.render(marked)
        return self.encode(text[text.index(DOCUMENT) + len(DOCUMENT) :])

    def split(self, text: str, answer_start: int, message_start: int = 0) -> tuple[list[int], list[int]]:
        """(context, prompt) tokens of a whole prompt ``text`` whose last user text runs from
        character ``message_start`` to ``answer_start``: the prompt is that text's protected tail
        (see module docstring) and every token after it."""
        answer = self.encode(text[answer_start:])
        paragraph = text.rfind(PARAGRAPH_BREAK, message_start, answer_start)
        if paragraph >= 0:  # the break starts the tail: BPE pieces begin with their whitespace
            tail = self.encode(text[paragraph:answer_start])
            if len(tail) <= self.protect_tail:
                return self.encode(text[:paragraph]), tail + answer
        head = self.encode(text[:answer_start])
        cut = max(len(head) - self.protect_tail, 0)
        return head[:cut], head[cut:] + answer

    def split_chat(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """(context, prompt) tokens of a chat with at least one user message (``split``)."""
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")
        marked = [*messages[:last], {**messages[last], "content": DOCUMENT}, *messages[last + 1 :]]
        text = self.render(marked)
        content = messages[last]["content"]
        message_start = text.index(DOCUMENT)
        text = text.replace(DOCUMENT, content, 1)
        return self.split(text, message_start + len(content), message_start)

    def split_completion(self, prompt: str) -> tuple[list[int], list[int]]:
        """(context, prompt) tokens of a completion prompt, the whole of it read as the last user
        text (``split``)."""
        return self.split(prompt, len(prompt))
