"""Helpers for the serve tests (no tests here): a real redis-server, server subprocesses, ports."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_binary() -> str | None:
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if os.path.exists(p)), None
    )


def wait_for(check, timeout: float, what: str, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: process exited with status {process.returncode}")
        with contextlib.suppress(Exception):
            result = check()
            if result:
                return result
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


@contextlib.contextmanager
def redis_server():
    """A redis-server on 127.0.0.1 (a free port, nothing saved), or ``KVSQUEEZE_REDIS_URL`` if set.

    Skips (with the reason) where the Debian package ``redis-server`` is not installed, except in
    CI, where ``.ci/run`` installs it, so a missing binary fails.
    """
    import redis

    if url := os.environ.get("KVSQUEEZE_REDIS_URL"):
        yield url
        return
    binary = redis_binary()
    if binary is None:
        message = "redis-server is not installed (apt-get install redis-server, or scripts/start-redis.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_for(lambda: redis.Redis.from_url(url).ping(), 20, "redis-server", process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


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


@contextlib.contextmanager
def server_process(*args: str, port: int | None = None, timeout: float = 120):
    """``python -m kvsqueeze.serve ARGS --port P`` on 127.0.0.1; yields its base URL, always stopped."""
    port = port or free_port()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"kvsqueeze-serve-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "kvsqueeze.serve", *args, "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_for(lambda: http("GET", f"{base}/health")[0] == 200, timeout, "server", process)
        except Exception as error:
            raise RuntimeError(f"{error}; log:\n{log_path.read_text()[-3000:]}") from None
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
