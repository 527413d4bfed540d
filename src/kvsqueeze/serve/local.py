"""A kvsqueeze server or a throwaway ``redis-server`` as subprocesses on 127.0.0.1.

For scripts, benchmarks and integration tests: each context manager picks a free port, waits until
the process answers, yields its URL and always stops the process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check: Callable[[], T], timeout: float, what: str, process: subprocess.Popen | None = None) -> T:
    """Call ``check`` until it returns something true (exceptions count as not yet); raise
    ``TimeoutError`` after ``timeout`` seconds, ``RuntimeError`` if ``process`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: process exited with status {process.returncode}")
        with contextlib.suppress(Exception):
            if result := check():
                return result
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


def _stop(process: subprocess.Popen, group: bool = False) -> None:
    """SIGTERM, then SIGKILL after 30 s: to ``process``, or with ``group`` to its whole process group
    (it runs in a session of its own), children included."""

    def send(sig: signal.Signals) -> None:
        if not group:
            process.send_signal(sig)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)

    send(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        process.wait(timeout=10)


def redis_binary() -> str | None:
    """Path of ``redis-server`` (Debian package ``redis-server``), or None if not installed."""
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if os.path.exists(p)), None
    )


@contextlib.contextmanager
def local_redis(timeout: float = 20) -> Iterator[str]:
    """A ``redis-server`` that saves nothing; yields ``redis://127.0.0.1:PORT/0``.

    Raises ``FileNotFoundError`` if ``redis-server`` is not installed.
    """
    import redis

    binary = redis_binary()
    if binary is None:
        raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_for(lambda: redis.Redis.from_url(url).ping(), timeout, "redis-server", process)
        yield url
    finally:
        _stop(process)


def _healthy(base: str) -> bool:
    with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
        return response.status == 200


@contextlib.contextmanager
def local_server(*args: str, timeout: float = 180) -> Iterator[str]:
    """``python -m kvsqueeze.serve ARGS`` on a free 127.0.0.1 port; yields its base URL.

    If it does not become healthy, the error carries the end of its log.
    """
    with local_server_process(*args, timeout=timeout) as (base, _process):
        yield base


@contextlib.contextmanager
def local_server_process(*args: str, timeout: float = 180) -> Iterator[tuple[str, subprocess.Popen]]:
    """As ``local_server``, yielding (base URL, the server's process) to signal or wait for it."""
    port = free_port()
    command = [sys.executable, "-m", "kvsqueeze.serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    with healthy_process(command, base, "server", timeout) as process:
        yield base, process


@contextlib.contextmanager
def healthy_process(
    command: list[str],
    base: str,
    what: str,
    timeout: float,
    env: dict[str, str] | None = None,
    own_session: bool = False,
) -> Iterator[subprocess.Popen]:
    """Run ``command`` (an HTTP server listening at ``base``) until ``base/health`` answers 200;
    yield its process and stop it at the end. With ``own_session`` it runs in a session of its
    own and its whole process group is stopped, whatever its leader did. If it does not become
    healthy, the error (naming ``what``) carries the end of its log."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=own_session
        )
        try:
            try:
                wait_for(lambda: _healthy(base), timeout, what, process)
            except (TimeoutError, RuntimeError) as error:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-3000:]
                raise RuntimeError(f"{error}; log:\n{tail}") from None
            yield process
        finally:
            if own_session or process.poll() is None:
                _stop(process, group=own_session)
