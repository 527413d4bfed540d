"""OpenAI response shapes: chat and text completions, whole or as server-sent-event chunks, and usage."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass
class Reply:
    """What every response of one request shares."""

    request_id: str
    created: int
    model: str
    chat: bool

    def _body(self, kind: str, choice: dict) -> dict:
        return {
            "id": self.request_id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    def chunk(self, delta: dict | str | None, reason: str | None) -> dict:
        """One streamed chunk: a chat ``delta`` dict or a completion's text."""
        if self.chat:
            choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": reason}
            return self._body("chat.completion.chunk", choice)
        choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}
        return self._body("text_completion", choice)

    def whole(self, content: str, reason: str | None, usage: dict, extension: dict) -> dict:
        """The non-streamed response."""
        if self.chat:
            message = {"role": "assistant", "content": content}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": reason}
        body = self._body("chat.completion" if self.chat else "text_completion", choice)
        return {**body, "usage": usage, "kvsqueeze": extension}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's ``usage`` object, with how many prompt tokens were reused rather than prefilled."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def sse(payload: dict) -> str:
    """One server-sent event carrying ``payload`` as compact JSON."""
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
