"""SIGTERM / SIGINT drain: stop taking requests, let those in flight finish for a bounded time, exit.

uvicorn on its own stops listening at the first signal and then waits for every open connection,
however long; a request that never ends kept the process up. Here the first signal makes the
server refuse new requests with 503 (``/health`` too, so a load balancer moves away) while it
still listens; requests in flight run on for at most ``drain_seconds``; whatever is still running
then gets an error event; and uvicorn is told to exit, with ``SHUTDOWN_GRACE_SECONDS`` to send
those last events. A second signal exits at once.
"""

from __future__ import annotations

import logging
import threading
import time
from types import FrameType

import uvicorn

from kvsqueeze.serve.app import Server

log = logging.getLogger("kvsqueeze.serve.drain")

# after the drain, how long uvicorn may spend closing connections (sending the final events)
SHUTDOWN_GRACE_SECONDS = 5


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` whose first exit signal drains ``server`` for ``drain_seconds``."""

    def __init__(self, config: uvicorn.Config, server: Server, drain_seconds: float):
        config.timeout_graceful_shutdown = SHUTDOWN_GRACE_SECONDS
        super().__init__(config)
        self.server = server
        self.drain_seconds = drain_seconds
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining:
            self.force_exit = self.should_exit = True
            return
        self._draining = True
        self.server.begin_drain()
        log.warning(
            "signal %d: refusing new requests, draining %d in flight for at most %g s",
            sig,
            self.server.runner.in_flight(),
            self.drain_seconds,
        )
        threading.Thread(target=self._drain, name="kvsqueeze-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_seconds
        while self.server.runner.in_flight() and time.monotonic() < deadline:
            time.sleep(0.05)
        if left := self.server.runner.in_flight():
            log.warning("drain time over: ending %d requests still in flight", left)
            self.server.runner.abort(f"the server shut down after draining for {self.drain_seconds:g} s")
            deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
            while self.server.runner.in_flight() and time.monotonic() < deadline:
                time.sleep(0.05)
        self.should_exit = True
