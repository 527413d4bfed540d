"""Shared pieces of the serve benchmarks: server and Redis processes on 127.0.0.1, documents, TTFT.

Every process started here is stopped by its context manager; every request loop is bounded.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
import urllib.request
from pathlib import Path

import openai

from kvsqueeze.serve.local import local_redis, local_server, redis_binary

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
KEY = "bench-key"
THREADS_HELP = "torch threads per server (default 1: on a shared CPU two OpenMP threads stall on small ops)"

WORDS = [
    *("river", "harbor", "lantern", "meadow", "quarry", "orchard", "summit", "canyon", "archive"),
    *("beacon", "cellar", "garden", "market", "tunnel", "bridge", "tower", "valley", "forest"),
    *("island", "village", "station", "library", "kitchen", "workshop"),
]


def document(tokens_wanted: int, seed: int, fact: str) -> str:
    """Seeded filler sentences with ``fact`` in the middle, about ``tokens_wanted`` tokens long."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(max(tokens_wanted // 9, 1)):
        a, b, c = rng.sample(WORDS, 3)
        sentences.append(f"The {a} near the {b} faces the {c}.")
    sentences.insert(len(sentences) // 2, fact)
    return " ".join(sentences)


@contextlib.contextmanager
def server(*args: str, timeout: float = 180):
    """``python -m kvsqueeze.serve ARGS`` for the benchmark model and key; yields its base URL."""
    with local_server(
        "--model", MODEL, "--api-key", KEY, "--log-level", "warning", *args, timeout=timeout
    ) as base:
        yield base


@contextlib.contextmanager
def redis():
    """A throwaway redis-server on 127.0.0.1 (Debian package ``redis-server``); yields its URL."""
    if redis_binary() is None:
        raise SystemExit("redis-server is not installed: run scripts/install-redis.sh (as root)")
    with local_redis() as url:
        yield url


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=KEY, base_url=f"{base}/v1", max_retries=0, timeout=600)


def timed_chat(base: str, messages: list[dict], max_tokens: int = 8, **extra) -> tuple[float, str, dict]:
    """(seconds to the first generated text, the whole answer, the final chunk's kvsqueeze info,
    with ``cached_tokens`` and ``prompt_tokens`` added when ``stream_options`` asks for usage)."""
    start = time.perf_counter()
    first, parts, info = None, [], {}
    stream = client(base).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, stream=True, **extra
    )
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                first = first or time.perf_counter()
                parts.append(choice.delta.content)
        info = (chunk.model_extra or {}).get("kvsqueeze", info)
        if chunk.usage is not None:
            cached = chunk.usage.prompt_tokens_details.cached_tokens
            info = {**info, "cached_tokens": cached, "prompt_tokens": chunk.usage.prompt_tokens}
    return (first or time.perf_counter()) - start, "".join(parts), info


def metrics(base: str) -> dict[str, float]:
    """The server's Prometheus metrics without labels, by name."""
    request = urllib.request.Request(f"{base}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def create_context(base: str, text: str) -> dict:
    return client(base).post("/contexts", body={"document": text}, cast_to=object)


def dump(path: str | None, payload: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2))
