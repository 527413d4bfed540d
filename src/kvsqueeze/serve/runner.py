"""The model runner: owns the model and every KV tensor, runs on one worker thread.

Each step (``step``) holds at most ``max_step_tokens`` tokens, as Sarathi-Serve's stall-free
batching does (Agrawal et al., 2024, arXiv:2403.02310): one decode token per running row, and
the rest for prefill. Take new requests and cancellations from the inbox; feed the sequence being
prefilled (admitted in an earlier step, or the oldest waiting one that fits, ``Scheduler``) into
its own ``CompressedCache`` as far as the step's prefill tokens go: its context as the recipe's
``PrefillStrategy`` feeds it (resumed from the prefix cache when the strategy passes through
reusable chunk-boundary states, or from a stored context) in whole chunks, then the prompt tail
uncompressed. What is left waits for the next step (``Prefilling``), so a long prompt never
stalls the running rows for more than a step. A sequence whose prefill is done is stacked into
the running batch and the next one starts in the same step if tokens are left; then the whole
batch decodes one token. A step feeds at least one chunk (or what is left of the tail, if less),
so a prefill progresses however many rows run; a strategy that compresses the whole context at
once (``feeds_in_pieces`` False) feeds it in one step. Rows are aligned at their ends by
``CompressedCache.stack``; each row gets its own position ids and a 2D mask that is zero over its
``offsets`` columns. Finished, cancelled and preempted rows leave with ``batch_select_indices``.

Failures: a request whose prefill raises fails alone; a decode step that raises is isolated by
``_isolate``; any other exception in a step fails the running batch; if the thread itself dies,
``Supervisor`` calls ``recover`` (every request in flight fails) and starts it again.

Results go out through each sequence's ``sink(event, value)`` (called on the worker thread):
``("token", id)``, ``("context", Entry)``, ``("done", info dict)``, ``("error", message)``.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvsqueeze.attention import install
from kvsqueeze.cache import CompressedCache
from kvsqueeze.models import kv_cache_spec
from kvsqueeze.prefill import DEFAULT_CHUNK_SIZE, prefill
from kvsqueeze.recipe import Recipe
from kvsqueeze.serve.prefix import PrefixCache, worth_saving
from kvsqueeze.serve.scheduler import Scheduler, Sequence, Status
from kvsqueeze.serve.store import Entry
from kvsqueeze.storage.layer import dense_block_size

log = logging.getLogger("kvsqueeze.serve.runner")

# decode steps a row of a failed batched step runs alone before it may share a batch again
SUSPECT_STEPS = 16
# offsets (left gaps of rows shorter than the longest) are squeezed out once they pass this
_MAX_IDLE_OFFSET = 4096


@dataclass
class Prefilling:
    """A sequence admitted and not yet running: its own cache and how far it is fed."""

    seq: Sequence
    cache: CompressedCache
    done: int  # context tokens in the cache
    tail: list[int]  # fed uncompressed after the context
    tail_done: int = 0
    logits: torch.Tensor | None = None

    @property
    def context_left(self) -> int:
        return len(self.seq.context) - self.done


@dataclass
class RunnerStats:
    """Counters the metrics endpoint reads (written by the worker thread only)."""

    steps: int = 0
    prefill_tokens: int = 0
    step_prefill_tokens: int = 0  # prefill tokens of the last step
    max_step_prefill_tokens: int = 0
    decode_tokens: int = 0
    preemptions: int = 0
    max_running: int = 0
    kv_bytes: int = 0
    peak_kv_bytes: int = 0


class Runner:
    """Continuous batching of ``Sequence`` objects on one model (see module docstring).

    Parameters
    ----------
    model : a causal LM (``install`` is applied to it).
    recipe : the compression recipe of every cache.
    kv_memory : the KV budget in bytes (what the running caches really hold).
    chunk_size : context prefill chunk, also the prefix-reuse block (a reconstructing recipe
        compresses the whole context at once: no prefix reuse, only stored contexts).
    prefix_cache : saved chunk-boundary states, or None to disable prefix reuse.
    eos_ids : token ids that end a sequence.
    max_running : cap on the running batch size.
    max_step_tokens : tokens a step holds: its running rows' decode tokens, and prefill tokens
        (context in whole chunks) for the rest; at least one chunk is prefilled when a sequence
        waits, so keep it at least ``chunk_size`` above the running batch (default: two chunks;
        the chunks' forwards are the same for any value, it sets how many run between decodes).
    tokenizer : needed by recipes that read the context's tokens: a unit (``words``), KVzip.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        recipe: Recipe,
        kv_memory: int,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        prefix_cache: PrefixCache | None = None,
        eos_ids: set[int] | frozenset[int] = frozenset(),
        max_running: int = 64,
        max_step_tokens: int | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ):
        self.strategy = recipe.prefill_strategy(tokenizer)
        self.strategy.check(recipe)
        self.model = install(model)
        self.tokenizer = tokenizer
        self.recipe = recipe
        self.chunk_size = chunk_size
        self.prefix_cache = prefix_cache if self.strategy.reuses_prefix_states else None
        self.eos_ids = frozenset(eos_ids)
        self.max_step_tokens = max_step_tokens or 2 * chunk_size
        layers, kv_heads, head_dim = kv_cache_spec(model.config)
        element = model.dtype.itemsize
        # keys + values, and the int32 slot a stacked or compressed row stores per token
        self.entry_bytes = 2 * head_dim * element + 4
        self.entries_per_token = layers * kv_heads
        self.token_bytes = self.entry_bytes * self.entries_per_token
        # storage is paged: a head holds whole blocks, plus one table entry (int64) per block
        codecs = recipe.block_codecs(head_dim)
        self.block_tokens = dense_block_size(CompressedCache(recipe).block_size, codecs)
        self.block_bytes = self.entries_per_token * (self.block_tokens * self.entry_bytes + 8)
        self.scheduler = Scheduler(kv_memory, self.estimate, self.growth, max_running)
        self.cache: CompressedCache | None = None
        self.inbox: queue.Queue = queue.Queue()
        self.stats = RunnerStats()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.failure: str | None = None
        self._joining: Prefilling | None = None
        self._queued = 0  # "add" commands in the inbox
        self._queued_lock = threading.Lock()

    # ---- sizes -------------------------------------------------------------------------------
    def kept(self, context_tokens: int) -> int:
        """Context tokens a head keeps after compression (an upper bound for own-count budgets)."""
        if not self.recipe.evicts or self.recipe.ratio == 0:
            return context_tokens
        return math.ceil((1.0 - self.recipe.ratio) * context_tokens)

    def estimate(self, seq: Sequence) -> int:
        """Peak bytes of ``seq`` during its prefill and right after it (see ``Scheduler``)."""
        tail = len(seq.prompt) + len(seq.output) + 1
        return self._bytes(self._peak(len(seq.context), tail, seq.restored is not None))

    def _peak(self, context: int, tail: int, restored: bool = False) -> int:
        """Tokens per head at the peak: while the context is compressed (as its prefill strategy
        says: one uncompressed chunk on top of what is kept, or KVzip's context and one piece of
        its copy), or once the tail is fed."""
        kept = self.kept(context)
        if restored or kept == context:
            during = kept
        else:
            during = self.strategy.peak_tokens(context, kept, self.chunk_size)
        return max(during, kept + tail)

    def bytes_needed_alone(self, context: int, prompt: int, max_tokens: int) -> int:
        """What one request needs with nobody else running (the submit-time check); a recipe's
        decoding component bounds what the answer adds."""
        decoding = self.recipe.decoding
        if decoding is None:
            return self._bytes(self._peak(context, prompt + max_tokens))
        kept = self.kept(context)
        held = decoding.most_held(kept + prompt, context + prompt, max_tokens)
        return self._bytes(self._peak(context, max(held - kept, prompt + 1)))

    def growth(self, seq: Sequence | None) -> int:
        """Bytes ``seq``'s row allocates at the next decode step (see ``Scheduler``); a row not yet
        in the batch may need a block for every head."""
        if seq is None or self.cache is None:
            return self.block_bytes
        row = self.scheduler.running.index(seq)
        return self.cache.append_blocks(row) * (self.block_bytes // self.entries_per_token)

    def _bytes(self, tokens: int) -> int:
        """Bytes a row holding ``tokens`` tokens per KV head holds in whole blocks."""
        return -(-tokens // self.block_tokens) * self.block_bytes

    def held(self, seq: Sequence) -> int:
        """Bytes the running batch holds for ``seq``'s row (its stored entries)."""
        row = self.scheduler.running.index(seq)
        return self.cache.held_tokens(row) * self.entry_bytes

    def used(self) -> int:
        """Bytes the running batch and the sequence being prefilled hold."""
        joining = 0 if self._joining is None else self._joining.cache.nbytes()
        return self._batch_bytes() + joining

    def _batch_bytes(self) -> int:
        return 0 if self.cache is None else self.cache.nbytes()

    # ---- thread ------------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        with self._queued_lock:
            self._queued += 1
        self.inbox.put(("add", seq))

    def waiting(self) -> int:
        """Sequences submitted and not running: in the inbox or the scheduler's waiting queue."""
        return self._queued + len(self.scheduler.waiting)

    def _take(self, command: str, seq: Sequence | None) -> Sequence | None:
        """Account for one command taken from the inbox; returns the sequence if it was an add."""
        if command != "add":
            return None
        with self._queued_lock:
            self._queued -= 1
        return seq

    def cancel(self, seq: Sequence) -> None:
        self.inbox.put(("cancel", seq))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kvsqueeze-runner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        """The worker thread is running steps (False before ``start``, after a crash or ``stop``)."""
        return self._thread is not None and self._thread.is_alive() and self.failure is None

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while not self._stop.is_set():
                try:
                    self.step(block=True)
                except Exception as error:  # a bug must not kill the worker: fail the batch, go on
                    log.exception("runner step failed; failing the running requests")
                    message = f"internal error in the model runner: {type(error).__name__}: {error}"
                    self._fail([*self.scheduler.running, *self._drop_joining()], message)
        except BaseException as error:  # the recovery itself failed: ``Supervisor`` restarts us
            self.failure = f"{type(error).__name__}: {error}"
            log.critical("the model runner thread died: %s", self.failure, exc_info=True)

    def recover(self, message: str) -> int:
        """After the worker thread died: fail every request in flight with ``message``, empty the
        queues and the batch, clear ``failure`` (``start`` may run again). Returns how many failed."""
        if self._thread is not None:
            self._thread.join(timeout=10)
        failed = [*self.scheduler.running, *self.scheduler.waiting, *self._drop_joining()]
        while True:
            try:
                command, seq = self.inbox.get_nowait()
            except queue.Empty:
                break
            if self._take(command, seq) is not None:
                failed.append(seq)
        self.failure = None
        return self._fail(failed, message)

    def _drop_joining(self) -> list[Sequence]:
        """The sequence being prefilled, if any (it is in no queue then); its cache is dropped."""
        joining, self._joining = self._joining, None
        return [] if joining is None else [joining.seq]

    def abort(self, message: str) -> None:
        """End every request in flight with ``message`` (at the worker's next step)."""
        self.inbox.put(("abort", message))

    def in_flight(self) -> int:
        """Requests submitted and not finished."""
        return self.waiting() + len(self.scheduler.running) + (self._joining is not None)

    def _fail(self, seqs: list[Sequence], message: str) -> int:
        """End ``seqs`` (every running one among them) with an error; their rows are not selected
        out of the cache, which is dropped: it may be what failed."""
        failed = [seq for seq in seqs if seq.status is not Status.FINISHED]
        for seq in failed:
            self.scheduler.finish(seq, "error")
            seq.sink("error", message)
        if not self.scheduler.running:
            self.cache = None
        return len(failed)

    # ---- one step ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, block: bool = False) -> None:
        """Drain the inbox, prefill within the step's tokens, then decode the running batch by one."""
        self._drain(block and not self.scheduler.has_work() and self._joining is None)
        fed = self._prefill_step()
        self.stats.step_prefill_tokens = fed
        self.stats.max_step_prefill_tokens = max(self.stats.max_step_prefill_tokens, fed)
        if self.scheduler.running:
            self._decode()
        self.stats.kv_bytes = self.used()
        self.stats.peak_kv_bytes = max(self.stats.peak_kv_bytes, self.stats.kv_bytes)

    def _drain(self, block: bool) -> None:
        while True:
            try:
                command, seq = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if self._take(command, seq) is not None:
                self.scheduler.add(seq)
            elif command == "abort":
                self._fail([*self.scheduler.running, *self.scheduler.waiting, *self._drop_joining()], seq)
            elif command == "cancel" and seq.status is not Status.FINISHED:
                seq.cancelled = True
                self._finish(seq, "cancelled")

    def _prefill_step(self) -> int:
        """Feed prefills within what the running rows leave of ``max_step_tokens``; returns the
        prefill tokens fed. A prefill carried over from the last step that no longer fits next to
        the grown batch is preempted (it is the newest sequence)."""
        joining = self._joining
        if joining is not None and not self.scheduler.fits(self._batch_bytes(), joining.seq):
            log.info("preempting sequence %d (recompute later) to fit --kv-memory", joining.seq.id)
            self._preempt_joining()
        fed = 0
        while True:
            joining = self._joining
            if joining is None:
                seq = self.scheduler.admit_one(self.used())
                if seq is None:
                    return fed
                self._begin(seq)
            elif self._prefilled(joining):
                self._join(joining)
            else:
                # rows that join this step decode in it too
                room = self.max_step_tokens - len(self.scheduler.running) - fed
                piece = self._feed(joining, room, first=not fed)
                if not piece and self._joining is joining:
                    return fed
                fed += piece

    def _begin(self, seq: Sequence) -> None:
        """Start ``seq``'s prefill: from a stored context, else the longest saved prefix, else empty."""
        cache, done = None, 0
        try:
            if seq.restored is not None:
                entry: Entry = seq.restored
                cache = CompressedCache.from_state_dict(entry.tensors, entry.meta["cache"])
                done = len(seq.context)
            elif self.prefix_cache is not None and seq.context:
                hit = self.prefix_cache.lookup(seq.context, seq.scope)
                if hit is not None:
                    done, cache = hit
        except Exception as error:
            log.exception("prefill failed for sequence %d", seq.id)
            self._finish(seq, "error", error=f"prefill failed: {error}")
            return
        if seq.preemptions == 0:
            seq.cached_tokens = done
        cache = cache or CompressedCache(self.recipe, config=self.model.config)
        # a resumed (preempted) sequence refeeds what it generated, all but the pending last token
        tail = [] if seq.kind == "context" else seq.prompt + seq.output[:-1]
        self._joining = Prefilling(seq, cache, done, tail)
        if done == len(seq.context):
            self._context_fed(self._joining)

    def _feed(self, joining: Prefilling, room: int, first: bool) -> int:
        """Feed ``joining`` at most ``room`` tokens, at least one chunk (or the tail's rest) if it
        is the ``first`` piece of the step: whole chunks of context (all of it, as the first piece,
        for a strategy that cannot feed it in pieces), then tail tokens. Returns how many were fed."""
        seq = joining.seq
        room = max(room, self.chunk_size if first else 0)
        try:
            if joining.context_left:
                if self.strategy.feeds_in_pieces:
                    length = min(joining.context_left, room // self.chunk_size * self.chunk_size)
                else:
                    length = joining.context_left if first else 0
                if length:
                    self._feed_context(joining, joining.done + length)
                    if not joining.context_left:
                        self._context_fed(joining)
                return length
            length = min(len(joining.tail) - joining.tail_done, room)
            if length:
                self._feed_tail(joining, length)
            return length
        except Exception as error:
            log.exception("prefill failed for sequence %d", seq.id)
            self._finish(seq, "error", error=f"prefill failed: {error}")
            return 0

    def _prefilled(self, joining: Prefilling) -> bool:
        return not joining.context_left and joining.tail_done == len(joining.tail)

    def _context_fed(self, joining: Prefilling) -> None:
        """The context is in the cache: hand its state to the store if asked to."""
        seq = joining.seq
        if seq.kind == "context" or seq.save_context:
            tensors, meta = joining.cache.state_dict()
            entry = Entry({k: v.clone() for k, v in tensors.items()}, {"tokens": seq.context, "cache": meta})
            seq.sink("context", entry)

    def _join(self, joining: Prefilling) -> None:
        """A finished prefill: a context-only sequence ends; another one starts running."""
        seq = joining.seq
        if seq.kind == "context":
            self._finish(seq, "stop")
            return
        if not seq.output:
            seq.output.append(self._sample(seq, joining.logits))
            seq.sink("token", seq.output[-1])
        self.cache = (
            joining.cache if self.cache is None else CompressedCache.stack([self.cache, joining.cache])
        )
        self._joining = None
        self.scheduler.start(seq)
        self.stats.max_running = max(self.stats.max_running, len(self.scheduler.running))
        self._finish_if_done(seq)

    def _preempt_joining(self) -> None:
        """Drop the prefill in progress; its sequence goes back to the front of the queue."""
        for seq in self._drop_joining():
            self.scheduler.preempt(seq)
            self.stats.preemptions += 1

    def _feed_context(self, joining: Prefilling, stop: int) -> None:
        """Feed the context from ``joining.done`` to ``stop``, as the recipe's prefill strategy does,
        saving prefix states (``worth_saving``) when the strategy passes through reusable ones."""
        seq, cache = joining.seq, joining.cache
        ids = torch.tensor([seq.context], dtype=torch.long, device=self.model.device)

        def save(end: int) -> None:
            if self.prefix_cache is not None and worth_saving(end, self.chunk_size, len(seq.context)):
                self.prefix_cache.save(seq.context, end, cache, seq.scope)

        logits = self.strategy.prefill(
            self.model,
            cache,
            ids,
            torch.ones_like(ids),
            self.chunk_size,
            start=joining.done,
            on_chunk=save,
            stop=stop,
        )
        self.stats.prefill_tokens += stop - joining.done
        joining.done, joining.logits = stop, logits[0]

    def _feed_tail(self, joining: Prefilling, length: int) -> None:
        """Feed the next ``length`` tokens of the prompt tail (or a resumed sequence's output)
        uncompressed, in one forward."""
        cache, device = joining.cache, self.model.device
        past = cache.get_seq_length()
        tokens = joining.tail[joining.tail_done : joining.tail_done + length]
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        mask = torch.ones(1, past + len(tokens), dtype=torch.long, device=device)
        with cache.settings(compress_prefill=False):
            logits = prefill(self.model, cache, ids, mask)
        self.stats.prefill_tokens += length
        joining.tail_done += length
        joining.logits = logits[0]

    def _decode(self) -> None:
        for victim in self.scheduler.to_preempt(self.used(), self.held):
            log.info("preempting sequence %d (recompute later) to fit --kv-memory", victim.id)
            self._drop_rows([victim])
            self.scheduler.preempt(victim)
            self.stats.preemptions += 1
        running = self.scheduler.running
        if len(running) == 1 and self.used() + self.growth(running[0]) > self.scheduler.budget_bytes:
            log.warning("sequence %d alone outgrew --kv-memory; stopping it", running[0].id)
            self._finish(running[0], "length")
        if not running:
            return
        device = self.model.device
        tokens = torch.tensor([[seq.output[-1]] for seq in running], device=device)
        positions = torch.tensor([[seq.total_tokens - 1] for seq in running], device=device)
        seen = self.cache.get_seq_length()
        offsets = self.cache.offsets.to(device)
        mask = (torch.arange(seen + 1, device=device)[None] >= offsets[:, None]).long()
        try:
            out = self.model(
                input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=self.cache
            )
        except Exception as error:
            self._isolate(error)
            return
        for seq in running:
            seq.suspect = max(seq.suspect - 1, 0)
        logits = out.logits[:, -1]
        self.stats.steps += 1
        for row, seq in enumerate(list(running)):
            seq.output.append(self._sample(seq, logits[row]))
            seq.sink("token", seq.output[-1])
            self.stats.decode_tokens += 1
        for seq in list(running):
            self._finish_if_done(seq)

    def _isolate(self, error: Exception) -> None:
        """A decode step raised. Alone, the row fails. Otherwise which row caused it is unknown and
        the cache may hold part of the step: every row is recomputed as a ``suspect`` that decodes
        alone for its next ``SUSPECT_STEPS`` tokens, so a failing row fails by itself and the
        others go on with the same answers (at the cost of running one at a time meanwhile)."""
        running = list(self.scheduler.running)
        log.warning("decode step of %d rows failed: %s: %s", len(running), type(error).__name__, error)
        if len(running) == 1:
            self._finish(running[0], "error", error=f"decode failed: {type(error).__name__}: {error}")
            return
        self.cache = None
        self._preempt_joining()  # behind the suspects, which were admitted before it
        for seq in reversed(running):
            seq.suspect = SUSPECT_STEPS
            self.scheduler.preempt(seq)

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> int:
        if seq.temperature <= 0:
            return int(logits.argmax())
        if seq.generator is None:
            seq.generator = torch.Generator(device=logits.device)
            seq.generator.manual_seed(seq.seed if seq.seed is not None else int(time.time_ns() % 2**31))
        probs = torch.softmax(logits.float() / seq.temperature, dim=-1)
        if seq.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > seq.top_p
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        return int(torch.multinomial(probs, 1, generator=seq.generator))

    def _finish_if_done(self, seq: Sequence) -> None:
        if seq.output and seq.output[-1] in self.eos_ids:
            self._finish(seq, "stop")
        elif len(seq.output) >= seq.max_tokens:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq.status is Status.RUNNING:
            self._drop_rows([seq])
        elif self._joining is not None and self._joining.seq is seq:
            self._joining = None
        self.scheduler.finish(seq, reason)
        if error is not None:
            seq.sink("error", error)
            return
        generated = [t for t in seq.output if t not in self.eos_ids]
        seq.sink(
            "done",
            {
                "finish_reason": reason,
                "prompt_tokens": len(seq.context) + len(seq.prompt),
                "completion_tokens": len(generated),
                "cached_tokens": seq.cached_tokens,
                "preemptions": seq.preemptions,
            },
        )

    def _drop_rows(self, leaving: list[Sequence]) -> None:
        running = self.scheduler.running
        keep = [row for row, seq in enumerate(running) if seq not in leaving]
        if not keep:
            self.cache = None
            return
        if len(keep) == len(running):
            return
        self.cache.batch_select_indices(torch.tensor(keep))
        if int(self.cache.offsets.min()) > _MAX_IDLE_OFFSET:
            self.cache = CompressedCache.stack(self.cache.split())
