"""Helpers for the serve tests (no tests here): a real redis-server, plain HTTP requests.

Ports, waiting and server subprocesses come from ``kvsqueeze.serve.local``.
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.error
import urllib.request

import pytest

from kvsqueeze.serve.local import local_redis, redis_binary


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
