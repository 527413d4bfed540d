"""The server never dies and never lies (tiny random model, real tokenizer, the openai client):
a failing request fails alone, a dead worker is reported and restarted, the queue is bounded."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from test_serve_helpers import http, serving
from test_serve_runner import Poisoned

from kvsqueeze.serve.local import wait_for

MODEL = "tiny"


def client(base):
    return openai.OpenAI(api_key="unused", base_url=f"{base}/v1", max_retries=0, timeout=120)


def ask(base, text, max_tokens=6):
    response = client(base).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=max_tokens
    )
    return response.choices[0].message.content


def stream(base, text, max_tokens=6):
    chunks = client(base).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=max_tokens, stream=True
    )
    return "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)


LONG = "The museum opens at nine and closes at five. " * 12  # ~130 tokens, the others ~20


def test_a_request_failing_inside_the_model_gets_a_500_and_the_others_answer(tiny, monkeypatch):
    model, tokenizer = tiny
    with serving(model, tokenizer, model_name=MODEL) as (base, server):
        alone = [ask(base, text) for text in ("Hi", "Name a colour.")]
        prompt_tokens = len(server.prompts.encode(server.prompts.render([{"role": "user", "content": LONG}])))
        monkeypatch.setattr(model, "forward", Poisoned(model.forward, limit=prompt_tokens + 2))
        with ThreadPoolExecutor(4) as pool:
            failing = pool.submit(ask, base, LONG)
            failing_stream = pool.submit(stream, base, LONG)
            others = [pool.submit(ask, base, text) for text in ("Hi", "Name a colour.")]
            with pytest.raises(openai.InternalServerError, match="decode failed: RuntimeError: injected"):
                failing.result()
            with pytest.raises(openai.APIError, match="injected failure"):
                failing_stream.result()
            assert [future.result() for future in others] == alone
        assert server.runner.alive and http("GET", f"{base}/health")[0] == 200


class Crash(BaseException):
    """Not an ``Exception``: nothing in the runner catches it, the worker thread ends."""


def test_a_dead_worker_fails_its_requests_reports_503_and_is_restarted(tiny, monkeypatch):
    model, tokenizer = tiny
    forward = model.forward
    crashed = threading.Event()

    def crash_once(*args, **kwargs):
        if not crashed.is_set():
            crashed.set()
            raise Crash("injected crash")
        return forward(*args, **kwargs)

    with serving(model, tokenizer, model_name=MODEL, restart_delay=2.0) as (base, server):
        monkeypatch.setattr(model, "forward", crash_once)
        with pytest.raises(openai.InternalServerError, match="runner died \\(Crash: injected crash\\)"):
            ask(base, "Hi")
        status, body = http("GET", f"{base}/health")
        assert status == 503 and "injected crash" in body["reason"]
        with pytest.raises(openai.APIStatusError, match="restarting") as refused:
            ask(base, "Hi")
        assert refused.value.status_code == 503 and refused.value.response.headers["retry-after"] == "1"
        wait_for(lambda: http("GET", f"{base}/health")[0] == 200, 30, "the restarted worker")
        assert ask(base, "Hi")  # served again
        assert server.supervisor.restarts == 1
        assert "kvsqueeze_runner_restarts_total 1" in http("GET", f"{base}/metrics")[1]


def test_a_full_waiting_queue_answers_429_with_retry_after(tiny, monkeypatch):
    model, tokenizer = tiny
    forward, gate = model.forward, threading.Event()

    def held(*args, **kwargs):
        gate.wait(60)
        return forward(*args, **kwargs)

    with serving(model, tokenizer, model_name=MODEL, max_running=1, max_waiting=1) as (base, server):
        monkeypatch.setattr(model, "forward", held)
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(ask, base, "Hi")
            wait_for(lambda: server.runner.scheduler.running or server.runner.waiting() == 0, 30, "admission")
            waiting = pool.submit(ask, base, "Hello")
            wait_for(lambda: server.runner.waiting() == 1, 30, "a waiting request")
            with pytest.raises(openai.RateLimitError, match="--max-waiting is 1") as refused:
                ask(base, "One more")
            assert refused.value.response.headers["retry-after"] == "1"
            gate.set()
            assert running.result() and waiting.result()


def test_prompts_are_tokenized_off_the_event_loop(tiny, monkeypatch):
    model, tokenizer = tiny
    with serving(model, tokenizer, model_name=MODEL) as (base, server):
        threads = []
        encode = server.prompts.encode

        def recording(text):
            threads.append(threading.current_thread().name)
            return encode(text)

        monkeypatch.setattr(server.prompts, "encode", recording)
        assert ask(base, "Hi", max_tokens=2) is not None
        client(base).completions.create(model=MODEL, prompt="Some context.\n\nHi", max_tokens=2)
    assert len(threads) >= 4 and all(name.startswith("kvsqueeze-tokenize") for name in threads)
