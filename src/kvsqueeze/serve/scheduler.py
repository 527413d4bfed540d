"""Waiting / running queues, admission by real KV bytes, preemption by recompute.

The scheduler decides, before every step of the runner, which waiting sequences join the
running batch and which running sequences must leave to let the batch grow by one token.
Bytes come from the runner: ``used`` is what the running batch's cache really holds
(``CompressedCache.nbytes()``), a waiting sequence is charged an estimate of its peak during
prefill (its compressed context plus one chunk, plus its uncompressed prompt tail), and a decode
step costs one token per running row. FCFS: the oldest waiting sequence goes first and nobody
overtakes it. When a decode step would not fit, the most recently admitted sequence is
preempted: its cache is dropped and it goes back to the front of the queue, to be recomputed
(prefilled again, with its generated tokens) when memory frees up. A prefill the runner feeds
over several steps is the most recent: it is preempted first if it no longer ``fits``. The
oldest running sequence is never preempted, so the batch always makes progress. A ``suspect``
(a row of a batched step that raised, recomputed) decodes alone for a few steps, so a row that
makes steps fail is found and fails by itself.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One request as the runner sees it: token ids in, token ids out, events to a sink.

    ``context`` tokens are compressed by the recipe as they are prefilled (chunk-aligned from
    position 0, so their states are shareable prefixes); ``prompt`` tokens after them are kept
    whole. ``restored`` is a context cache from the store (its ``state_dict`` entry) to start from
    instead of prefilling ``context``. ``kind`` is ``"generate"`` or ``"context"`` (prefill the
    context only and hand its state back).
    """

    context: list[int]
    prompt: list[int]
    max_tokens: int
    sink: Callable[[str, object], None]
    stop_ids: frozenset[int] = frozenset()
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    scope: str = "public"
    kind: str = "generate"
    restored: object | None = None
    save_context: bool = False
    id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    output: list[int] = field(default_factory=list)
    arrival: float = field(default_factory=time.perf_counter)
    cached_tokens: int = 0
    preemptions: int = 0
    cancelled: bool = False
    suspect: int = 0  # decode steps this row must still run alone (see ``Runner._isolate``)
    finish_reason: str | None = None
    generator: torch.Generator | None = None

    @property
    def total_tokens(self) -> int:
        return len(self.context) + len(self.prompt) + len(self.output)


class Scheduler:
    """FCFS admission under ``budget_bytes`` of KV; see module docstring.

    Parameters
    ----------
    budget_bytes : the ``--kv-memory`` budget.
    estimate : bytes a waiting sequence needs at the peak of its prefill (and right after it).
    growth : bytes a running sequence's row allocates at the next decode step (a block for each
        of its KV heads whose last block is full); ``growth(None)`` for a row that just joined.
    max_running : cap on the running batch size.
    """

    def __init__(
        self,
        budget_bytes: int,
        estimate: Callable[[Sequence], int],
        growth: Callable[[Sequence | None], int],
        max_running: int = 64,
    ):
        self.budget_bytes = budget_bytes
        self.estimate = estimate
        self.growth = growth
        self.max_running = max_running
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def admit_one(self, used: int) -> Sequence | None:
        """The oldest waiting sequence if its prefill fits now (``used`` = real bytes held), else None.

        The runner prefills one admitted sequence at a time and asks again with the bytes really
        held afterwards, so a prefill's transient peak is charged once, not per running sequence.
        An idle server always takes the oldest request: the submit-time check made sure it fits.
        """
        if not self.waiting or len(self.running) >= self.max_running:
            return None
        seq = self.waiting[0]
        if self.running and (seq.suspect or any(other.suspect for other in self.running)):
            return None  # a row suspected of failing a batched step decodes alone
        if not self.fits(used, seq):
            return None
        return self.waiting.popleft()

    def fits(self, used: int, seq: Sequence) -> bool:
        """Whether ``seq``'s prefill (its peak) and the running batch's next decode step fit next
        to ``used`` bytes; asked again before each later step of a prefill fed in pieces."""
        if not self.running:
            return True
        need = self.estimate(seq) + self.growth(None) + sum(self.growth(other) for other in self.running)
        return used + need <= self.budget_bytes

    def start(self, seq: Sequence) -> None:
        seq.status = Status.RUNNING
        self.running.append(seq)

    def to_preempt(self, used: int, held: Callable[[Sequence], int]) -> list[Sequence]:
        """Running sequences to drop (newest first) so that one decode step fits the budget.

        ``held(seq)`` is the bytes the running batch holds for that sequence's row.
        """
        victims: list[Sequence] = []
        rows = len(self.running)
        growing = sum(self.growth(seq) for seq in self.running)
        while rows > 1 and used + growing > self.budget_bytes:
            victim = self.running[rows - 1]
            victims.append(victim)
            used -= held(victim)
            growing -= self.growth(victim)
            rows -= 1
        return victims

    def preempt(self, seq: Sequence) -> None:
        """Send ``seq`` (running, or admitted and not yet running) back to the front of the queue."""
        if seq in self.running:
            self.running.remove(seq)
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
