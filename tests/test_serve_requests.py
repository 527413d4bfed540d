"""Request bodies checked without a server: what each parser accepts, and the error it answers."""

from __future__ import annotations

import json

import pytest

from kvsqueeze.serve.requests import (
    APIError,
    Sampling,
    parse_body,
    parse_completion_prompt,
    parse_messages,
    parse_sampling,
)
from kvsqueeze.serve.responses import Reply, sse, usage


def error_of(call, *args) -> APIError:
    with pytest.raises(APIError) as caught:
        call(*args)
    return caught.value


def test_a_body_is_a_json_object_for_the_served_model_within_the_size_limit():
    assert parse_body(b'{"model": "m", "x": 1}', 100, "m") == {"model": "m", "x": 1}
    assert error_of(parse_body, b"{}" + b" " * 99, 100, "m").status == 413
    assert error_of(parse_body, b"[1]", 100, "m").status == 400
    assert error_of(parse_body, b"{", 100, "m").status == 400
    other = error_of(parse_body, b'{"model": "other"}', 100, "m")
    assert (other.status, other.code, other.param) == (404, "model_not_found", "model")


def test_sampling_defaults_limits_and_stop_strings():
    assert parse_sampling({}, 100, 16) == Sampling(16)
    body = {
        "max_completion_tokens": 5,
        "max_tokens": 50,
        "temperature": 1,
        "top_p": 0.5,
        "seed": 3,
        "stop": "\n",
    }
    assert parse_sampling(body, 100, 16) == Sampling(5, 1.0, 0.5, 3, ("\n",))
    for bad, param in [
        ({"max_tokens": 101}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 2}, "n"),
        ({"seed": "1"}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ]:
        assert error_of(parse_sampling, bad, 100, 16).param == param


def test_messages_join_text_parts_and_need_a_user():
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert parse_messages(parts) == [{"role": "user", "content": "ab"}]
    assert "at least one user" in error_of(parse_messages, [{"role": "system", "content": "s"}]).message
    assert error_of(parse_messages, [{"role": "tool", "content": "x"}]).param == "messages"
    assert error_of(parse_messages, []).param == "messages"


def test_a_completion_prompt_is_one_string_without_a_context_id():
    assert parse_completion_prompt({"prompt": ["one"]}) == "one"
    assert error_of(parse_completion_prompt, {"prompt": ["a", "b"]}).param == "prompt"
    assert error_of(parse_completion_prompt, {"prompt": "p", "context_id": "ctx-1"}).param == "context_id"


def test_replies_follow_openais_shapes():
    chat, text = Reply("chatcmpl-1", 7, "m", chat=True), Reply("cmpl-1", 7, "m", chat=False)
    assert chat.chunk({"content": "hi"}, None)["choices"][0]["delta"] == {"content": "hi"}
    assert chat.chunk(None, "stop")["object"] == "chat.completion.chunk"
    assert text.chunk("hi", None)["choices"][0]["text"] == "hi"
    whole = chat.whole("answer", "length", usage(10, 2, 4), {"recipe": "full"})
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "answer"}
    assert whole["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 2,
        "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    assert text.whole("answer", "stop", usage(1, 1, 0), {})["object"] == "text_completion"
    event = sse({"a": [1, 2]})
    assert event.startswith("data: ") and event.endswith("\n\n") and json.loads(event[6:]) == {"a": [1, 2]}
