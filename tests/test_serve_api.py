"""The server in-process (uvicorn on 127.0.0.1), driven by the official ``openai`` client."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from test_serve_helpers import http, serving

from kvsqueeze.engine import generate
from kvsqueeze.serve.app import ServeConfig, Server
from kvsqueeze.serve.local import wait_for

pytestmark = pytest.mark.real_model

MODEL = "smollm2-135m"
KEY_A, KEY_B = "key-a", "key-b"
QUESTIONS = [
    "What is the capital of France?",
    "Name a primary color.",
    "What is 2 + 2?",
    "Which animal says moo?",
    "What do bees make?",
    "What is the opposite of hot?",
]


def running(model, tokenizer, **options):
    """A ``Server`` on a free port in a background thread; yields (base URL, server)."""
    return serving(model, tokenizer, model_name=MODEL, api_keys=(KEY_A, KEY_B), **options)


@pytest.fixture(scope="module")
def served(real_model):
    model, tokenizer = real_model
    with running(model, tokenizer, kv_memory=256 << 20, max_tokens_limit=64, max_request_bytes=64 << 10) as (
        base,
        server,
    ):
        yield base, server


def client(base, key=KEY_A):
    return openai.OpenAI(api_key=key, base_url=f"{base}/v1", max_retries=0, timeout=300)


def ask(base, question, max_tokens=16, **extra):
    response = client(base).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, **extra
    )
    return response


def stream(base, question, max_tokens=16):
    chunks = client(base).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = [], None, None
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(text), usage, finish


def test_chat_completion_answers_and_fills_usage(served):
    base, _ = served
    response = ask(base, QUESTIONS[0])
    assert "Paris" in response.choices[0].message.content
    assert response.choices[0].finish_reason in ("stop", "length")
    usage = response.usage
    assert usage.prompt_tokens > 10 and 0 < usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    completion = client(base).completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4)
    assert completion.usage.completion_tokens == 4 and completion.choices[0].finish_reason == "length"
    assert [m.id for m in client(base).models.list()] == [MODEL]


def test_two_concurrent_streams_get_their_own_answers(served):
    base, server = served
    alone = [ask(base, q, max_tokens=24).choices[0].message.content for q in QUESTIONS[:2]]
    before = server.runner.stats.max_running
    server.runner.stats.max_running = 0
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda q: stream(base, q, max_tokens=24), QUESTIONS[:2]))
    assert [text for text, _, _ in results] == alone
    for (_text, usage, finish), question in zip(results, QUESTIONS[:2], strict=True):
        assert usage is not None and usage.completion_tokens > 0, question
        assert finish in ("stop", "length")
    assert server.runner.stats.max_running == 2  # they shared decode steps
    server.runner.stats.max_running = max(before, 2)


def test_bounded_concurrent_requests_complete_under_a_small_kv_budget(real_model, served):
    base, _ = served
    alone = [ask(base, q, max_tokens=12).choices[0].message.content for q in QUESTIONS]
    model, tokenizer = real_model
    probe = Server(ServeConfig(model_name=MODEL), model, tokenizer).runner
    budget = probe.token_bytes * 110  # room for about two of these requests at a time
    with running(model, tokenizer, kv_memory=budget) as (small, server):
        started = time.monotonic()
        with ThreadPoolExecutor(len(QUESTIONS)) as pool:
            answers = list(
                pool.map(lambda q: ask(small, q, max_tokens=12).choices[0].message.content, QUESTIONS)
            )
        elapsed = time.monotonic() - started
        stats = server.runner.stats
        assert answers == alone
        assert stats.peak_kv_bytes <= budget
        assert 1 <= stats.max_running < len(QUESTIONS)  # the others waited
        assert elapsed < 240
        metrics = http("GET", f"{small}/metrics", headers={"Authorization": f"Bearer {KEY_A}"})[1]
        assert (
            "kvsqueeze_kv_bytes_peak" in metrics
            and "kvsqueeze_time_to_first_token_seconds_count 6" in metrics
            and f"kvsqueeze_step_prefill_tokens_max {stats.max_step_prefill_tokens}" in metrics
        )
        assert 0 < stats.max_step_prefill_tokens <= server.runner.max_step_tokens


def test_context_is_prefilled_once_and_matches_the_library(served, real_model):
    base, _server = served
    model, tokenizer = real_model
    document = (
        "The museum opens at nine. " * 20 + "The secret word is pelican. " + "Tea is served at four. " * 20
    )
    created = client(base).post("/contexts", body={"document": document}, cast_to=object)
    assert created["id"].startswith("ctx-") and created["tokens"] > 250 and not created["cached"]
    again = client(base).post("/contexts", body={"document": document}, cast_to=object)
    assert again["id"] == created["id"] and again["cached"] and again["tier"] == "ram"
    question = "What is the secret word?"
    response = ask(base, question, extra_body={"context_id": created["id"]})
    extension = response.model_extra["kvsqueeze"]
    assert extension["context_tier"] == "ram"
    assert response.usage.prompt_tokens_details.cached_tokens == created["tokens"]
    expected = generate(model, tokenizer, document, question, "full", chunk_size=256, max_new_tokens=16)
    assert response.choices[0].message.content == expected.answer
    assert "pelican" in expected.answer
    # a context belongs to the key that created it
    with pytest.raises(openai.NotFoundError, match="not found"):
        client(base, KEY_B).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": question}],
            max_tokens=4,
            extra_body={"context_id": created["id"]},
        )


def test_a_document_pasted_into_the_user_message_is_compressed_and_reused(real_model):
    """How OpenAI clients send a document: in the one user message, the question after a blank
    line. Everything but the question is compressed; the same request again, or another question
    on the same document, reuses that whole context (``cached_tokens``) and answers as a cold
    request does."""
    model, tokenizer = real_model
    document = "The museum opens at nine. " * 90 + "The pass key is 73914. " + "Tea is served at four. " * 90

    def messages(question: str) -> list[dict]:
        return [{"role": "user", "content": f"{document}\n\n{question}"}]

    def pasted(question: str):
        return client(base).chat.completions.create(model=MODEL, messages=messages(question), max_tokens=12)

    with running(model, tokenizer, recipe="keydiff@0.75", kv_memory=256 << 20) as (base, server):
        first, again = pasted("What is the pass key?"), pasted("What is the pass key?")
        fed = server.runner.stats.prefill_tokens
        other = pasted("Tell me: what is the pass key?")
        context, _ = server.prompts.split_chat(messages("What is the pass key?"))
    with running(model, tokenizer, recipe="keydiff@0.75", kv_memory=256 << 20, prefix_cache=0) as (base, _):
        cold = pasted("Tell me: what is the pass key?")
    assert "73914" in first.choices[0].message.content
    assert again.choices[0].message.content == first.choices[0].message.content
    assert other.choices[0].message.content == cold.choices[0].message.content
    prompt_tokens = first.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    for reused in (again, other):
        assert reused.usage.prompt_tokens_details.cached_tokens == len(context) > 0.9 * prompt_tokens
    assert fed == 2 * prompt_tokens - len(context)


def test_a_kvzip_context_is_compressed_once_and_answers_as_the_library(real_model):
    model, tokenizer = real_model
    document = "The museum opens at nine. " * 20 + "The pass key is 73914. " + "Tea is served at four. " * 20
    question = "What is the pass key?"
    with running(model, tokenizer, recipe="kvzip+words@0.75", kv_memory=256 << 20) as (base, server):
        created = client(base).post("/contexts", body={"document": document}, cast_to=object)
        response = ask(base, question, extra_body={"context_id": created["id"]})
    assert server.runner.stats.prefill_tokens < 2 * created["tokens"]  # one reconstruction pass
    expected = generate(model, tokenizer, document, question, "kvzip+words@0.75", max_new_tokens=16)
    assert response.choices[0].message.content == expected.answer
    assert "73914" in expected.answer


def test_auth_and_limits_give_clear_4xx(served):
    base, _ = served
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        client(base, "wrong").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert http("GET", f"{base}/health")[0] == 200
    assert http("GET", f"{base}/metrics")[0] == 401
    assert http("GET", f"{base}/v1/models", headers={"Authorization": "Bearer nope"})[0] == 401
    with pytest.raises(openai.BadRequestError, match="exceeds this server's limit of 64"):
        ask(base, "hi", max_tokens=65)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client(base).chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    status, body = http(
        "POST",
        f"{base}/v1/chat/completions",
        body=b"{" + b" " * (100 << 10) + b"}",
        headers={"Authorization": f"Bearer {KEY_A}"},
    )
    assert status == 413 and "exceeds the limit" in body["error"]["message"]
    status, body = http(
        "POST",
        f"{base}/v1/chat/completions",
        body={"messages": []},
        headers={"Authorization": f"Bearer {KEY_A}"},
    )
    assert status == 400 and "messages" in body["error"]["message"]
    long_prompt = "word " * 9000
    with pytest.raises(openai.BadRequestError, match="the model supports"):
        ask(base, long_prompt, max_tokens=4)


def test_stop_strings_end_the_answer(served):
    base, _ = served
    response = ask(base, QUESTIONS[0], max_tokens=16, stop=["Paris"])
    assert "Paris" not in response.choices[0].message.content
    assert response.choices[0].finish_reason == "stop"


def test_a_client_that_hangs_up_frees_its_row(served):
    base, server = served
    port = int(base.rsplit(":", 1)[1])
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Count from 1 to 100, separated by commas."}],
            "max_tokens": 64,
        }
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {KEY_A}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    steps_before = server.runner.stats.decode_tokens
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head + body)
        wait_for(lambda: server.runner.stats.decode_tokens > steps_before, 120, "first decode step")
    wait_for(lambda: not server.runner.scheduler.running, 30, "the row to leave")
    assert server.runner.stats.decode_tokens - steps_before < 60  # cancelled, not run to max_tokens


def test_a_short_request_joining_a_long_kivi2_stream_both_answer(real_model):
    """Issue 13's reproduction: with kivi2, a ~1k-token chat request streaming, then "Hi"
    (max_tokens 8) joins; it used to kill the runner thread."""
    model, tokenizer = real_model
    document = "The grass is green. The sky is blue. " * 85 + "The pass key is 68315. " + "Birds sing. " * 30
    long_question = document + "\nWhat is the pass key?"
    with running(model, tokenizer, recipe="kivi2", kv_memory=256 << 20) as (base, server):
        alone = [
            ask(base, q, max_tokens=n).choices[0].message.content for q, n in ((long_question, 12), ("Hi", 8))
        ]
        server.runner.stats.max_running = 0
        with ThreadPoolExecutor(2) as pool:
            streaming = pool.submit(stream, base, long_question, 12)
            wait_for(lambda: server.runner.stats.max_running == 1, 120, "the long request to run")
            short = pool.submit(ask, base, "Hi", 8)
            joined = [streaming.result()[0], short.result().choices[0].message.content]
        assert server.runner.stats.max_running == 2
    assert joined == alone
    assert "68315" in alone[0] and alone[1]
