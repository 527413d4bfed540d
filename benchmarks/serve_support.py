"""Shared pieces of the serve benchmarks: server and Redis processes on 127.0.0.1, documents, TTFT.

Every process started here is stopped by its context manager; every request loop is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai

from kvsqueeze.serve.local import free_port, healthy_process, local_redis, local_server_process, redis_binary

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
    with server_process(*args, timeout=timeout) as (base, _pid):
        yield base


@contextlib.contextmanager
def server_process(*args: str, timeout: float = 180) -> Iterator[tuple[str, int]]:
    """As ``server``, yielding (base URL, the server's pid)."""
    with local_server_process(
        "--model", MODEL, "--api-key", KEY, "--log-level", "warning", *args, timeout=timeout
    ) as (base, process):
        yield base, process.pid


@contextlib.contextmanager
def transformers_server(
    model_dir: Path, *args: str, threads: int, timeout: float = 300
) -> Iterator[tuple[str, int]]:
    """``transformers serve --continuous-batching`` of ``model_dir`` on CPU in fp32 on a free port, offline;
    yields (base URL, its pid). Requests must name ``str(model_dir)`` as their model (or none).

    It runs in a session of its own so that its whole process group is stopped at the end.
    """
    port = free_port()
    cli = Path(sys.executable).with_name("transformers")
    command = [str(cli), "serve", "--continuous-batching", "--device", "cpu", "--dtype", "float32"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *args, str(model_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    base = f"http://127.0.0.1:{port}"
    with healthy_process(command, base, "transformers serve", timeout, env=env, own_session=True) as process:
        yield base, process.pid


def tree_rss_bytes(root: int) -> int:
    """Resident bytes of process ``root`` and all its descendants now, from /proc (0 once it is gone)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError):
            # the command name in parentheses may hold spaces: the parent pid is the 2nd field after it
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    tree, grew = {root}, True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= children
        grew = bool(children)
    return sum(_rss_bytes(pid) for pid in tree)


def _rss_bytes(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """While open, samples ``tree_rss_bytes(pid)`` on a thread; ``peak`` is the largest sample."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def redis():
    """A throwaway redis-server on 127.0.0.1 (Debian package ``redis-server``); yields its URL."""
    if redis_binary() is None:
        raise SystemExit("redis-server is not installed: run scripts/install-redis.sh (as root)")
    with local_redis() as url:
        yield url


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=KEY, base_url=f"{base}/v1", max_retries=0, timeout=600)


def timed_chat(
    base: str, messages: list[dict], max_tokens: int = 8, model: str = MODEL, **extra
) -> tuple[float, str, dict]:
    """(seconds to the first generated text, the whole answer, the final chunk's kvsqueeze info,
    with ``cached_tokens`` (None if the server does not say), ``prompt_tokens`` and
    ``completion_tokens`` added when the server sends usage)."""
    start = time.perf_counter()
    first, parts, info = None, [], {}
    stream = client(base).chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, stream=True, **extra
    )
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                first = first or time.perf_counter()
                parts.append(choice.delta.content)
        info = (chunk.model_extra or {}).get("kvsqueeze", info)
        if chunk.usage is not None:
            details = chunk.usage.prompt_tokens_details
            info = {
                **info,
                "cached_tokens": details.cached_tokens if details else None,
                "prompt_tokens": chunk.usage.prompt_tokens,
                "completion_tokens": chunk.usage.completion_tokens,
            }
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
