"""``kvsqueeze serve`` as a process (tiny random model saved to disk): SIGTERM drains, then exits."""

from __future__ import annotations

import signal
import threading
import time

import openai
import pytest
from test_serve_helpers import http

from kvsqueeze.serve.limits import ENVIRONMENT_VARIABLE
from kvsqueeze.serve.local import local_server_process, wait_for

KEY = "key-from-the-environment"


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    model, tokenizer = tiny
    directory = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def stream(base, max_tokens, events):
    chunks = openai.OpenAI(api_key=KEY, base_url=f"{base}/v1", max_retries=0, timeout=60).chat.completions
    try:
        for chunk in chunks.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=max_tokens, stream=True
        ):
            events.append(chunk.choices[0].finish_reason if chunk.choices else None)
    except openai.APIError as error:
        events.append(error)


def test_sigterm_refuses_new_requests_finishes_short_ones_ends_long_ones_and_exits(tiny_dir, monkeypatch):
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, f"another-key,{KEY}")  # keys the server reads
    with local_server_process(
        "--model",
        tiny_dir,
        "--served-model-name",
        "tiny",
        "--drain-seconds",
        "2",
        "--max-tokens-limit",
        "4000",
        "--log-level",
        "warning",
    ) as (base, process):
        short, long = [], []
        threads = [
            threading.Thread(target=stream, args=(base, n, events))
            # 4000 tokens take the tiny model far longer than the 2 s drain even on a fast machine
            for n, events in ((8, short), (4000, long))
        ]
        for thread in threads:
            thread.start()
        wait_for(lambda: short and long, 60, "both streams to start")
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: http("GET", f"{base}/health")[0] == 503, 10, "draining")
        request = {"messages": [{"role": "user", "content": "Hi"}]}
        assert http("POST", f"{base}/v1/chat/completions", body=request)[0] == 401
        status, body = http(
            "POST", f"{base}/v1/chat/completions", body=request, headers={"Authorization": f"Bearer {KEY}"}
        )
        assert status == 503 and "shutting down" in body["error"]["message"]
        assert process.wait(timeout=30) == 0
        elapsed = time.monotonic() - signalled
        for thread in threads:
            thread.join(timeout=10)
    assert short[-1] in ("length", "stop")  # finished within the drain
    assert isinstance(long[-1], openai.APIError) and "shut down after draining for 2 s" in str(long[-1])
    assert 2 <= elapsed < 2 + 10
