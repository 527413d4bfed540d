"""Restart the model runner's worker thread when it dies, and say so while it is down.

A step that raises is handled inside the runner (the request fails, the others go on); what
reaches this module is the thread itself ending (the recovery raised too, or a ``BaseException``).
Then every request in flight gets an error at once (none waits for a thread that is gone), the
health check reports the reason, and after ``restart_delay`` seconds a fresh worker thread starts
on the same model with empty queues.
"""

from __future__ import annotations

import logging
import threading

from kvsqueeze.serve.runner import Runner

log = logging.getLogger("kvsqueeze.serve.supervisor")


class Supervisor:
    """Watches ``runner`` from its own thread (``start`` / ``stop``).

    Attributes
    ----------
    down : why the worker is down (None while it runs).
    restarts : how many times the worker was restarted.
    """

    def __init__(self, runner: Runner, restart_delay: float = 1.0, poll_seconds: float = 0.1):
        self.runner = runner
        self.restart_delay = restart_delay
        self.poll_seconds = poll_seconds
        self.down: str | None = None
        self.restarts = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.runner.start()
        self._thread = threading.Thread(target=self._watch, name="kvsqueeze-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.runner.stop()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            if self.runner.alive:
                continue
            self.down = f"the model runner died ({self.runner.failure or 'thread ended'}); restarting it"
            failed = self.runner.recover(f"{self.down}: retry the request")
            log.error("%s; %d requests in flight failed", self.down, failed)
            if self._stop.wait(self.restart_delay):
                return
            self.runner.start()
            self.restarts += 1
            self.down = None
            log.warning("model runner restarted (%d restarts so far)", self.restarts)
