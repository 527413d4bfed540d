"""FastAPI routes: OpenAI-compatible completions, contexts, models, health, metrics; auth and limits.

The asyncio side only validates, tokenizes, queues a ``Sequence`` for the ``Runner`` thread and
turns the token events it sends back into JSON or server-sent events. Nothing here touches a KV
tensor. Everything lives in one ``Server`` object (no module-level state), so tests can build
several in one process.

How a prompt is split (``kvsqueeze.serve.prompts``): the *context* tokens are prefilled in chunks
and compressed by the recipe, the *prompt* tokens after them are kept whole. Chat and completions:
everything but the protected tail of the last user message (or of the completion prompt: its last
paragraph if short, else its last ``--protect-tail`` tokens) and what follows it is context; with
``context_id`` the stored document (placed at the start of the first user message) is the context.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvsqueeze.budgets.head_profile import ProfileNotFoundError
from kvsqueeze.engine import eos_ids
from kvsqueeze.models import max_context_length, with_bos
from kvsqueeze.prefill import DEFAULT_CHUNK_SIZE
from kvsqueeze.recipe import Recipe
from kvsqueeze.serve.limits import RETRY_AFTER_SECONDS, AuthError, queue_full, scope_of
from kvsqueeze.serve.metrics import Metrics
from kvsqueeze.serve.prefix import PrefixCache
from kvsqueeze.serve.prompts import DEFAULT_PROTECT_TAIL, Prompts
from kvsqueeze.serve.requests import (
    APIError,
    Prepared,
    Sampling,
    parse_body,
    parse_completion_prompt,
    parse_document,
    parse_messages,
    parse_sampling,
)
from kvsqueeze.serve.responses import Reply, sse, usage
from kvsqueeze.serve.runner import Runner
from kvsqueeze.serve.scheduler import Sequence
from kvsqueeze.serve.store import ContextKey, Entry, TieredStore
from kvsqueeze.serve.supervisor import Supervisor
from kvsqueeze.serve.text import TextStream

log = logging.getLogger("kvsqueeze.serve")

T = TypeVar("T")

CONTEXT_PREFIX = "ctx-"


@dataclass
class ServeConfig:
    """Server settings (the ``kvsqueeze serve`` options)."""

    model_name: str
    recipe: str = "full"
    kv_memory: int = 2 << 30
    chunk_size: int = DEFAULT_CHUNK_SIZE
    protect_tail: int = DEFAULT_PROTECT_TAIL
    api_keys: tuple[str, ...] = ()
    stores: tuple[str, ...] = ()
    store_ram: int = 1 << 30
    prefix_cache: int = 512 << 20
    max_tokens_limit: int = 2048
    default_max_tokens: int = 256
    max_request_bytes: int = 4 << 20
    max_running: int = 64
    max_step_tokens: int | None = None  # None: two chunks
    max_waiting: int = 256
    store_ttl: float = 7 * 86400
    restart_delay: float = 1.0
    extra: dict = field(default_factory=dict)


class Server:
    """Model, tokenizer, runner, store and metrics of one server process (no global state)."""

    def __init__(self, config: ServeConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.prompts = Prompts(tokenizer, config.protect_tail)
        self.recipe = Recipe.parse(config.recipe)
        self.recipe_name = str(self.recipe)
        self.dtype = str(model.dtype).removeprefix("torch.")
        self.max_length = max_context_length(model, tokenizer)
        self.head_profile = profile_digest(self.recipe, getattr(model.config, "_name_or_path", ""))
        prefix = None
        if config.prefix_cache > 0:
            prefix = PrefixCache(
                config.prefix_cache, config.chunk_size, config.model_name, self.recipe_name, self.dtype
            )
        self.runner = Runner(
            model,
            self.recipe,
            config.kv_memory,
            chunk_size=config.chunk_size,
            prefix_cache=prefix,
            eos_ids=eos_ids(model, tokenizer),
            max_running=config.max_running,
            max_step_tokens=config.max_step_tokens,
            tokenizer=tokenizer,
        )
        self.supervisor = Supervisor(self.runner, config.restart_delay)
        self.store = TieredStore.from_specs(config.store_ram, list(config.stores), config.store_ttl)
        self.metrics = self._metrics()
        self.created = int(time.time())
        self.draining = False
        self.tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="kvsqueeze-tokenize")

    def _metrics(self) -> Metrics:
        metrics = Metrics()
        runner = self.runner
        metrics.describe("requests_total", "counter", "HTTP requests by route and status")
        metrics.describe("prompt_tokens_total", "counter", "prompt tokens received")
        metrics.describe("completion_tokens_total", "counter", "tokens generated")
        metrics.describe("cached_prompt_tokens_total", "counter", "prompt tokens not prefilled (reused)")
        metrics.describe("time_to_first_token_seconds", "histogram", "request arrival to first token")
        metrics.describe("context_cache_hits_total", "counter", "stored-context hits by tier")
        metrics.describe("context_cache_misses_total", "counter", "stored contexts absent or recomputed")
        metrics.describe("context_store_corrupt_total", "counter", "corrupt store entries detected")
        metrics.gauge("kv_bytes_in_use", lambda: runner.stats.kv_bytes)
        metrics.describe(
            "kv_bytes_in_use", "gauge", "bytes held by the running batch's KV cache and a prefill in progress"
        )
        metrics.gauge("kv_bytes_peak", lambda: runner.stats.peak_kv_bytes)
        metrics.describe("kv_bytes_peak", "gauge", "highest kv_bytes_in_use seen")
        metrics.gauge("kv_bytes_budget", lambda: self.config.kv_memory)
        metrics.describe("kv_bytes_budget", "gauge", "the --kv-memory budget")
        metrics.gauge("running_sequences", lambda: len(runner.scheduler.running))
        metrics.describe("running_sequences", "gauge", "sequences in the running batch")
        metrics.gauge("running_sequences_max", lambda: runner.stats.max_running)
        metrics.describe("running_sequences_max", "gauge", "largest running batch so far")
        metrics.gauge("waiting_sequences", runner.waiting)
        metrics.describe("waiting_sequences", "gauge", "sequences waiting for KV memory")
        metrics.gauge("preemptions_total", lambda: runner.stats.preemptions)
        metrics.describe("preemptions_total", "counter", "sequences preempted (recomputed later)")
        metrics.gauge("prefill_tokens_total", lambda: runner.stats.prefill_tokens)
        metrics.describe("prefill_tokens_total", "counter", "tokens run through prefill")
        metrics.gauge("step_prefill_tokens_max", lambda: runner.stats.max_step_prefill_tokens)
        metrics.describe(
            "step_prefill_tokens_max", "gauge", "most tokens one step prefilled (--max-step-tokens bounds it)"
        )
        metrics.gauge("runner_restarts_total", lambda: self.supervisor.restarts)
        metrics.describe("runner_restarts_total", "counter", "model runner threads restarted after dying")
        metrics.gauge("decode_steps_total", lambda: runner.stats.steps)
        metrics.describe("decode_steps_total", "counter", "batched decode steps")
        prefix = runner.prefix_cache
        metrics.gauge("prefix_cache_hits_total", lambda: 0 if prefix is None else prefix.hits)
        metrics.describe("prefix_cache_hits_total", "counter", "requests resumed from a saved prefix")
        metrics.gauge("prefix_cache_bytes", lambda: 0 if prefix is None else prefix.nbytes)
        metrics.describe("prefix_cache_bytes", "gauge", "bytes held by saved prefix states")
        return metrics

    def start(self) -> None:
        self.supervisor.start()

    def close(self) -> None:
        self.supervisor.stop()
        self.store.close()
        self.tokenizer_thread.shutdown(wait=False)

    def begin_drain(self) -> None:
        """Refuse new requests from now on (the process is shutting down)."""
        self.draining = True

    def unavailable(self) -> str | None:
        """Why new requests are refused with 503 right now, or None."""
        if self.draining:
            return "the server is shutting down: send the request to another replica or retry later"
        return self.supervisor.down

    # ---- auth and keys ---------------------------------------------------------------------
    def scope(self, request: Request) -> str:
        """The caller's scope (a hash of its API key); raises 401 when keys are required."""
        try:
            return scope_of(self.config.api_keys, request.headers.get("authorization", ""))
        except AuthError as error:
            raise APIError(401, str(error), "invalid_api_key") from None

    def submit(self, seq: Sequence) -> None:
        """Queue ``seq`` for the runner, or refuse: 503 while the server cannot serve, 429 when
        ``--max-waiting`` requests already wait."""
        retry = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        if (reason := self.unavailable()) is not None:
            raise APIError(503, reason, "unavailable", headers=retry)
        if (reason := queue_full(self.runner.waiting(), self.config.max_waiting)) is not None:
            raise APIError(429, reason, "queue_full", headers=retry)
        self.runner.submit(seq)

    def context_key(self, content_hash: str, scope: str) -> ContextKey:
        return ContextKey(
            self.config.model_name,
            self.recipe_name,
            self.dtype,
            content_hash,
            scope,
            chunk_size=self.config.chunk_size,
            head_profile=self.head_profile,
        )

    # ---- prompts ---------------------------------------------------------------------------
    async def off_loop(self, function: Callable[..., T], *args) -> T:
        """``function(*args)`` on the tokenizer thread: tokenizing and rendering a long prompt
        must not stall the event loop (every other stream's tokens); one thread, because a
        tokenizer is not safe to use from several at once."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_thread, function, *args)

    def check_chat_template(self) -> None:
        """Chat messages and stored documents are framed by the model's chat template; a model
        without one (a base model) gets a 400 pointing to ``/v1/completions``."""
        if not self.tokenizer.chat_template:
            raise APIError(
                400,
                f"model {self.config.model_name!r} has no chat template (a base model): chat messages "
                "cannot be framed for it; send a completion prompt to /v1/completions instead",
            )

    def check_size(self, context: int, prompt: int, max_tokens: int) -> None:
        total = context + prompt + max_tokens
        if total > self.max_length:
            raise APIError(
                400,
                f"this request needs {total} tokens ({context + prompt} prompt + {max_tokens} max_tokens) "
                f"but the model supports {self.max_length}; shorten the prompt or lower max_tokens",
                "context_length_exceeded",
            )
        if (fed := self.runner.strategy.positions_needed(context)) > self.max_length:
            raise APIError(
                400,
                f"{self.runner.recipe} feeds more than the context to compress it: this context needs "
                f"{fed} positions but the model supports {self.max_length}; shorten the context by "
                f"{fed - self.max_length} tokens",
                "context_length_exceeded",
            )
        need = self.runner.bytes_needed_alone(context, prompt, max_tokens)
        if need > self.config.kv_memory:
            raise APIError(
                400,
                f"this request needs about {need} bytes of KV cache but the server's --kv-memory is "
                f"{self.config.kv_memory}; shorten the prompt or lower max_tokens",
                "kv_memory_exceeded",
            )


def profile_digest(recipe: Recipe, model_name: str) -> str:
    """What stored caches record of the head profile ``recipe`` reads: ``"none"``, ``"missing"``
    (the request will fail and say why) or a digest of its scores."""
    try:
        profile = recipe.budget.head_profile(model_name) if recipe.budget is not None else None
    except ProfileNotFoundError:
        return "missing"
    if profile is None:
        return "none"
    return hashlib.sha256(json.dumps(profile.scores).encode()).hexdigest()[:16]


def create_app(server: Server) -> FastAPI:
    """The FastAPI application serving ``server`` (starts and stops its runner with the app)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.start()
        try:
            yield
        finally:
            server.close()

    app = FastAPI(title="kvsqueeze", lifespan=lifespan)
    config = server.config

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        server.metrics.inc("requests_total", route=request.url.path, status=str(error.status))
        return error.response()

    async def read_json(request: Request) -> dict:
        # checked before reading the body (and again after, for chunked bodies); not an HTTP
        # middleware, which would hide client disconnects from the routes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > config.max_request_bytes:
            raise APIError(
                413, f"request body of {length} bytes exceeds the limit of {config.max_request_bytes} bytes"
            )
        return parse_body(await request.body(), config.max_request_bytes, config.model_name)

    @app.get("/health")
    async def health():
        reason = server.unavailable()
        if reason is not None:
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        return {"status": "ok", "model": config.model_name, "recipe": server.recipe_name}

    @app.get("/metrics")
    async def metrics(request: Request):
        server.scope(request)
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        server.scope(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": config.model_name,
                    "object": "model",
                    "created": server.created,
                    "owned_by": "kvsqueeze",
                    "kvsqueeze": {"recipe": server.recipe_name, "kv_memory": config.kv_memory},
                }
            ],
        }

    @app.post("/v1/contexts")
    async def create_context(request: Request):
        scope = server.scope(request)
        body = await read_json(request)
        document = parse_document(body)
        server.check_chat_template()
        head = await server.off_loop(server.prompts.document_head, [])
        tokens = await server.off_loop(server.prompts.encode, head + document)
        server.check_size(len(tokens), 0, 1)
        content_hash = hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:32]
        key = server.context_key(content_hash, scope)
        lookup = await asyncio.to_thread(server.store.get, key)
        tier = lookup.tier
        if lookup.entry is None or lookup.entry.tensors is None:
            entry = await run_context_job(tokens, scope)
            entry.meta["head"] = head
            await asyncio.to_thread(server.store.put, key, entry)
            server.metrics.inc("context_cache_misses_total")
            nbytes = entry.nbytes
        else:
            server.metrics.inc("context_cache_hits_total", tier=tier)
            nbytes = lookup.entry.nbytes
        server.metrics.inc("requests_total", route="/v1/contexts", status="200")
        return {
            "id": CONTEXT_PREFIX + content_hash,
            "object": "context",
            "tokens": len(tokens),
            "kv_bytes": nbytes,
            "recipe": server.recipe_name,
            "cached": tier is not None and lookup.entry is not None and lookup.entry.tensors is not None,
            "tier": tier,
        }

    async def run_context_job(tokens: list[int], scope: str) -> Entry:
        queue = asyncio.Queue()
        seq = Sequence(
            context=tokens, prompt=[], max_tokens=0, sink=sink_for(queue), scope=scope, kind="context"
        )
        server.submit(seq)
        entry = None
        while True:
            event, value = await queue.get()
            if event == "context":
                entry = value
            elif event == "error":
                raise APIError(500, value)
            elif event == "done":
                return entry

    def sink_for(queue: asyncio.Queue):
        loop = asyncio.get_running_loop()

        def sink(event: str, value) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed at shutdown
                loop.call_soon_threadsafe(queue.put_nowait, (event, value))

        return sink

    async def resolve_context(context_id, scope: str, messages: list[dict], sampling: Sampling) -> Prepared:
        if not isinstance(context_id, str) or not context_id.startswith(CONTEXT_PREFIX):
            raise APIError(400, "context_id must be an id returned by POST /v1/contexts", param="context_id")
        key = server.context_key(context_id[len(CONTEXT_PREFIX) :], scope)
        lookup = await asyncio.to_thread(server.store.get, key)
        if lookup.corrupt:
            server.metrics.inc("context_store_corrupt_total")
        if lookup.entry is None:
            server.metrics.inc("context_cache_misses_total")
            raise APIError(
                404,
                f"context {context_id} not found (never created with this API key, or expired); "
                "POST /v1/contexts again",
                "context_not_found",
                "context_id",
            )
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")
        head = lookup.entry.meta.get("head", "")
        if await server.off_loop(server.prompts.document_head, messages[:first]) != head:
            raise APIError(
                400,
                "a request with context_id cannot put messages before the first user message that "
                "differ from those the context was created with",
                param="messages",
            )
        prompt = await server.off_loop(server.prompts.after_document, messages, first)
        prepared = Prepared(lookup.entry.meta["tokens"], prompt, sampling)
        prepared.context_key = key
        if lookup.entry.tensors is None:  # corrupt everywhere: recompute from the manifest's tokens
            server.metrics.inc("context_cache_misses_total")
            prepared.context_tier = "recomputed"
            prepared.save_context = lookup.entry
        else:
            server.metrics.inc("context_cache_hits_total", tier=lookup.tier)
            prepared.context_tier = lookup.tier
            prepared.restored = lookup.entry
        return prepared

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrival = time.perf_counter()
        scope = server.scope(request)
        body = await read_json(request)
        server.check_chat_template()
        messages = parse_messages(body.get("messages"))
        sampling = parse_sampling(body, config.max_tokens_limit, config.default_max_tokens)
        context_id = body.get("context_id")
        if context_id is not None:
            prepared = await resolve_context(context_id, scope, messages, sampling)
        else:
            context, prompt = await server.off_loop(server.prompts.split_chat, messages)
            prepared = Prepared(context, prompt, sampling)
        return await respond(request, body, prepared, scope, arrival, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        arrival = time.perf_counter()
        scope = server.scope(request)
        body = await read_json(request)
        prompt = with_bos(server.tokenizer, parse_completion_prompt(body))  # as the tokenizer would start it
        sampling = parse_sampling(body, config.max_tokens_limit, 16)
        context, prompt = await server.off_loop(server.prompts.split_completion, prompt)
        prepared = Prepared(context, prompt, sampling)
        return await respond(request, body, prepared, scope, arrival, chat=False)

    async def respond(
        request: Request, body: dict, prepared: Prepared, scope: str, arrival: float, chat: bool
    ):
        if not prepared.prompt and not prepared.context:
            raise APIError(400, "the prompt is empty")
        if not prepared.prompt:  # keep one token out of the compressed context
            prepared.context, prepared.prompt = prepared.context[:-1], prepared.context[-1:]
        sampling = prepared.sampling
        server.check_size(len(prepared.context), len(prepared.prompt), sampling.max_tokens)
        route = request.url.path
        queue: asyncio.Queue = asyncio.Queue()
        seq = Sequence(
            context=prepared.context,
            prompt=prepared.prompt,
            max_tokens=sampling.max_tokens,
            sink=sink_for(queue),
            stop_ids=frozenset(),
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            scope=scope,
            restored=prepared.restored,
            save_context=prepared.save_context is not None,
        )
        server.submit(seq)
        reply = Reply(
            ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
            int(time.time()),
            config.model_name,
            chat,
        )
        stream = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        text = TextStream(server.tokenizer, server.runner.eos_ids, list(sampling.stop))

        async def events():
            """(delta text, finish reason or None, info) as tokens arrive; cancels on stop strings."""
            first = True
            while True:
                event, value = await queue.get()
                if event == "token":
                    if first:
                        server.metrics.observe("time_to_first_token_seconds", time.perf_counter() - arrival)
                        first = False
                    delta = text.push(value)
                    if text.stopped:
                        server.runner.cancel(seq)
                    if delta:
                        yield delta, None, None
                elif event == "context":
                    await store_recomputed(prepared, value)
                elif event == "error":
                    raise APIError(500, value)
                elif event == "done":
                    reason = "stop" if text.stopped else value["finish_reason"]
                    if reason == "cancelled":
                        reason = "stop"
                    yield text.flush(), reason, value
                    return

        def counted_usage(info: dict) -> dict:
            server.metrics.inc("prompt_tokens_total", info["prompt_tokens"])
            server.metrics.inc("completion_tokens_total", text.count)
            server.metrics.inc("cached_prompt_tokens_total", info["cached_tokens"])
            return usage(info["prompt_tokens"], text.count, info["cached_tokens"])

        def extension(info: dict) -> dict:
            return {
                "context_tier": prepared.context_tier,
                "recipe": server.recipe_name,
                "preemptions": info["preemptions"],
            }

        if not stream:
            parts, reason, info = [], None, None

            async def watch_disconnect():
                # the client hanging up frees its row instead of decoding for nobody
                while not await request.is_disconnected():
                    await asyncio.sleep(0.25)
                server.runner.cancel(seq)

            watcher = asyncio.create_task(watch_disconnect())
            try:
                async for delta, finish, details in events():
                    parts.append(delta)
                    reason, info = finish or reason, details or info
            except asyncio.CancelledError:
                server.runner.cancel(seq)
                raise
            finally:
                watcher.cancel()
            server.metrics.inc("requests_total", route=route, status="200")
            return reply.whole("".join(parts), reason, counted_usage(info), extension(info))

        async def events_stream():
            try:
                if chat:
                    yield sse(reply.chunk({"role": "assistant", "content": ""}, None))
                async for delta, finish, info in events():
                    if delta:
                        yield sse(reply.chunk({"content": delta} if chat else delta, None))
                    if finish is not None:
                        final = reply.chunk({} if chat else "", finish)
                        final["kvsqueeze"] = extension(info)
                        yield sse(final)
                        if include_usage:
                            yield sse(
                                {**reply.chunk(None, None), "choices": [], "usage": counted_usage(info)}
                            )
                        else:
                            counted_usage(info)
                server.metrics.inc("requests_total", route=route, status="200")
                yield "data: [DONE]\n\n"
            except APIError as error:
                yield sse({"error": {"message": error.message, "type": "server_error", "code": error.code}})
            finally:
                server.runner.cancel(seq)  # a no-op when finished; frees the row if the client left

        return StreamingResponse(
            events_stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    async def store_recomputed(prepared: Prepared, entry: Entry) -> None:
        entry.meta["head"] = prepared.save_context.meta.get("head", "")
        log.warning("context %s was recomputed (corrupt in the store) and stored again", prepared.context_key)
        await asyncio.to_thread(server.store.put, prepared.context_key, entry)

    return app
