"""Helpers for the serve tests (no tests here): a server in a thread, a real redis-server, plain
HTTP requests.

Ports, waiting and server subprocesses come from ``kvsqueeze.serve.local``.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import urllib.error
import urllib.request

import pytest
import uvicorn

from kvsqueeze.serve.app import ServeConfig, Server, create_app
from kvsqueeze.serve.local import free_port, local_redis, redis_binary, wait_for


@contextlib.contextmanager
def serving(model, tokenizer, **config):
    """A ``Server(ServeConfig(**config))`` on a free port, uvicorn in a background thread; yields
    (base URL, server)."""
    server = Server(ServeConfig(**config), model, tokenizer)
    port = free_port()
    web = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: web.started, 60, "uvicorn")
        yield f"http://127.0.0.1:{port}", server
    finally:
        web.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def redis_server():
    """A redis-server on 127.0.0.1 (a free port, nothing saved), or ``KVSQUEEZE_REDIS_URL`` if set.

    Skips (with the reason) where the Debian package ``redis-server`` is not installed, except in
    CI, where ``.ci/run`` installs it, so a missing binary fails.
    """
    if url := os.environ.get("KVSQUEEZE_REDIS_URL"):
        yield url
        return
    if redis_binary() is None:
        message = "redis-server is not installed (apt-get install redis-server, or scripts/start-redis.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with local_redis() as url:
        yield url


def http(method: str, url: str, body=None, headers: dict | None = None, timeout: float = 60):
    """(status, parsed JSON or text) of one plain HTTP request (errors included, not raised)."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()
