"""Server processes: a context survives a restart (disk), is shared by replicas (Redis), and a
corrupt store file is recomputed, never served."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from test_serve_helpers import redis_server

from kvsqueeze.serve.local import local_server
from kvsqueeze.serve.store import DiskTier

pytestmark = pytest.mark.real_model

MODEL = "smollm2-135m"
KEY = "process-key"
DOCUMENT = (
    "The lighthouse keeper wrote in the log every evening. " * 8
    + "The code for the storeroom is 4817. "
    + "Gulls circled the rocks at dawn. " * 8
)
QUESTION = "What is the code for the storeroom?"
COMMON = ("--model", MODEL, "--kv-memory", "256MiB", "--api-key", KEY, "--log-level", "warning")


def client(base):
    return openai.OpenAI(api_key=KEY, base_url=f"{base}/v1", max_retries=0, timeout=300)


def create(base) -> dict:
    return client(base).post("/contexts", body={"document": DOCUMENT}, cast_to=object)


def ask(base, context_id):
    response = client(base).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=12,
        extra_body={"context_id": context_id},
    )
    return response.choices[0].message.content, response.model_extra["kvsqueeze"]["context_tier"]


def test_context_survives_restart_and_a_corrupt_file_is_recomputed(tmp_path):
    store = tmp_path / "store"
    with local_server(*COMMON, "--store", str(store)) as base:
        created = create(base)
        answer, tier = ask(base, created["id"])
    assert tier == "ram" and "4817" in answer

    with local_server(*COMMON, "--store", str(store)) as base:
        assert ask(base, created["id"]) == (answer, "disk")  # restarted: a hit from disk
        # corrupt the payload on disk; this process still has it in RAM, the next one will not
        payload = next(store.glob("*.safetensors"))
        data = bytearray(payload.read_bytes())
        data[len(data) // 2] ^= 0xFF
        payload.write_bytes(bytes(data))

    with local_server(*COMMON, "--store", str(store)) as base:
        assert ask(base, created["id"]) == (answer, "recomputed")  # detected, recomputed, same answer
        assert ask(base, created["id"]) == (answer, "ram")
    (manifest_path,) = store.glob("*.json")
    assert DiskTier(store).get(_key_from(manifest_path)).tensors  # stored again, intact


def test_two_replicas_share_contexts_through_redis():
    with redis_server() as url, contextlib.ExitStack() as stack:
        managers = [local_server(*COMMON, "--store", url) for _ in range(2)]
        with ThreadPoolExecutor(2) as pool:  # start both at once; stop whichever started
            futures = [pool.submit(manager.__enter__) for manager in managers]
            for manager, future in zip(managers, futures, strict=True):
                if future.exception() is None:
                    stack.push(manager.__exit__)
        first, second = (future.result() for future in futures)
        created = create(first)
        answer, tier = ask(second, created["id"])
        assert tier == "redis" and "4817" in answer
        assert ask(first, created["id"]) == (answer, "ram")


def _key_from(manifest_path):
    import json

    from kvsqueeze.serve.store import ContextKey

    return ContextKey(**json.loads(manifest_path.read_text())["key"])
