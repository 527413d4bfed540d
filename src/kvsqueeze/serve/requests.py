"""Request bodies checked into what a route needs; an ``APIError`` (OpenAI's error format) otherwise.

Pure functions of the body and the server's limits: no model, tokenizer or network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from fastapi.responses import JSONResponse

from kvsqueeze.serve.store import ContextKey, Entry

ROLES = ("system", "user", "assistant")


class APIError(Exception):
    """An error answered in OpenAI's format: ``{"error": {"message", "type", "code", "param"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}
        body = {
            "message": self.message,
            "type": kind.get(self.status, "invalid_request_error" if self.status < 500 else "server_error"),
            "param": self.param,
            "code": self.code,
        }
        return JSONResponse({"error": body}, status_code=self.status, headers=self.headers)


@dataclass
class Sampling:
    """How a request's answer is drawn and when it ends."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Prepared:
    """A validated request: token ids split into context and prompt, and how to run it."""

    context: list[int]
    prompt: list[int]
    sampling: Sampling
    restored: Entry | None = None
    context_tier: str | None = None
    save_context: Entry | None = None
    context_key: ContextKey | None = None


def parse_body(raw: bytes, max_bytes: int, model_name: str) -> dict:
    """The JSON object in ``raw``: 413 beyond ``max_bytes``, 400 if not an object, 404 for
    another ``model`` than the one served."""
    if len(raw) > max_bytes:
        raise APIError(413, f"request body exceeds the limit of {max_bytes} bytes")
    try:
        body = json.loads(raw)
    except ValueError:
        raise APIError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(
            404,
            f"model {model!r} is not served here; this server serves {model_name!r}",
            "model_not_found",
            "model",
        )
    return body


def parse_sampling(body: dict, limit: int, default_max: int) -> Sampling:
    """``max_tokens`` (or ``max_completion_tokens``, at most ``limit``), ``temperature``, ``top_p``,
    ``seed`` and ``stop`` of ``body``; only ``n=1`` is served."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = default_max if max_tokens is None else max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise APIError(400, f"max_tokens must be a positive integer, got {max_tokens!r}", param="max_tokens")
    if max_tokens > limit:
        raise APIError(
            400, f"max_tokens {max_tokens} exceeds this server's limit of {limit}", param="max_tokens"
        )
    temperature = body.get("temperature")
    temperature = 0.0 if temperature is None else temperature
    top_p = body.get("top_p")
    top_p = 1.0 if top_p is None else top_p
    if not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
        raise APIError(400, "temperature must be a number in [0, 2]", param="temperature")
    if not isinstance(top_p, int | float) or not 0 < top_p <= 1:
        raise APIError(400, "top_p must be a number in (0, 1]", param="top_p")
    if body.get("n", 1) not in (1, None):
        raise APIError(400, "only n=1 is supported", param="n")
    seed = body.get("seed")
    if seed is not None and not isinstance(seed, int):
        raise APIError(400, "seed must be an integer", param="seed")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise APIError(400, "stop must be a string or a list of up to 4 strings", param="stop")
    return Sampling(max_tokens, float(temperature), float(top_p), seed, tuple(stop))


def parse_messages(messages) -> list[dict]:
    """Chat ``messages`` as ``{"role", "content"}`` dicts with string content (a list of text
    parts is joined); at least one user message."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    checked = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise APIError(400, "each message needs a role of system, user or assistant", param="messages")
        content = message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            raise APIError(400, "message content must be a string", param="messages")
        checked.append({"role": message["role"], "content": content})
    if not any(message["role"] == "user" for message in checked):
        raise APIError(400, "messages need at least one user message", param="messages")
    return checked


def parse_completion_prompt(body: dict) -> str:
    """The completion ``prompt``: a non-empty string (or a list of exactly one); ``context_id``
    belongs to the chat route."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise APIError(400, "'prompt' must be a non-empty string", param="prompt")
    if body.get("context_id") is not None:
        raise APIError(400, "context_id is supported on /v1/chat/completions only", param="context_id")
    return prompt


def parse_document(body: dict) -> str:
    """The ``document`` of a ``POST /v1/contexts`` body: a non-empty string."""
    document = body.get("document")
    if not isinstance(document, str) or not document:
        raise APIError(400, "'document' must be a non-empty string", param="document")
    return document
