"""The runner on a tiny random model: continuous batching equals running each request alone."""

from __future__ import annotations

import itertools

import pytest
import torch
from tiny_models import tiny_model

from kvsqueeze.attention import install
from kvsqueeze.cache import CompressedCache
from kvsqueeze.engine import decode, prefill, prefill_context
from kvsqueeze.prefill import SMALLEST_CHUNK
from kvsqueeze.recipe import Recipe
from kvsqueeze.serve.app import APIError, ServeConfig, Server
from kvsqueeze.serve.local import wait_for
from kvsqueeze.serve.prefix import PrefixCache, chain_hashes
from kvsqueeze.serve.runner import Runner
from kvsqueeze.serve.scheduler import Sequence

CHUNK = 8


def reference(model, recipe, context, prompt, max_tokens, chunk=CHUNK, tokenizer=None):
    """One request alone: context prefilled in chunks and compressed (by the engine), prompt kept
    whole, greedy."""
    cache = CompressedCache(recipe)
    ids = torch.tensor([context + prompt])
    mask = torch.ones_like(ids)
    if context:
        prefill_context(model, tokenizer, cache, ids[:, : len(context)], mask[:, : len(context)], chunk)
    with cache.settings(compress_prefill=False):
        logits = prefill(model, cache, ids[:, len(context) :], mask)
    return decode(model, cache, logits, mask, set(), max_tokens)[0]


def tokens(seed, n):
    return torch.randint(3, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class Collector:
    def __init__(self):
        self.events = []

    def __call__(self, event, value):
        self.events.append((event, value))

    @property
    def tokens(self):
        return [value for event, value in self.events if event == "token"]

    @property
    def done(self):
        return next((value for event, value in self.events if event == "done"), None)

    @property
    def ended(self):
        return any(event in ("done", "error") for event, _ in self.events)


def make_requests(specs):
    return [
        (Sequence(context=tokens(i, c), prompt=tokens(100 + i, p), max_tokens=m, sink=Collector()))
        for i, (c, p, m) in enumerate(specs)
    ]


def run_until_done(runner, seqs, arrivals=None, limit=500):
    """Submit ``seqs`` at their ``arrivals`` steps and step until they and every request in
    flight ended."""
    arrivals = arrivals or [0] * len(seqs)
    for step in range(limit):
        for seq, at in zip(seqs, arrivals, strict=True):
            if at == step:
                runner.submit(seq)
        runner.step()
        if (
            all(seq.sink.ended for seq in seqs)
            and step >= max(arrivals, default=0)
            and not runner.in_flight()
        ):
            return
    raise AssertionError("requests did not finish")


SPECS = [(21, 3, 6), (0, 9, 4), (13, 5, 7), (30, 4, 5)]


@pytest.mark.parametrize("recipe", ["full", "knorm@0.5", "snapkv:window=4@0.5"])
def test_continuous_batching_matches_each_request_alone(recipe):
    model = install(tiny_model("qwen2"))
    recipe = Recipe.parse(recipe)
    runner = Runner(model, recipe, kv_memory=1 << 30, chunk_size=CHUNK)
    seqs = make_requests(SPECS)
    run_until_done(runner, seqs, arrivals=[0, 0, 2, 5])
    for seq in seqs:
        expected = reference(model, recipe, seq.context, seq.prompt, seq.max_tokens)
        assert seq.sink.tokens == expected
        assert seq.sink.done["completion_tokens"] == seq.max_tokens
        assert seq.sink.done["finish_reason"] == "length"
    assert runner.stats.max_running >= 3
    assert runner.cache is None and not runner.scheduler.has_work()


@pytest.mark.parametrize(
    "recipe",
    ["full", "knorm+words@0.5", "snapkv:window=4@0.5", "h2o@0.5", "snapkv+kivi2:residual=0@0.5", "kivi4"],
)
def test_a_context_fed_in_pieces_on_chunk_boundaries_equals_one_call(tiny, recipe):
    """What the server's token budget per step does to a long context: the same forwards, so the
    same bytes held, tensors and logits, quantization included (done once, after the last piece)."""
    model, tokenizer = tiny
    install(model)
    recipe = Recipe.parse(recipe)
    strategy = recipe.prefill_strategy(tokenizer)
    ids = torch.tensor([tokenizer.encode("The pass key is 4417093, not 51. " * 6)])
    assert ids.shape[1] % CHUNK and ids.shape[1] > 5 * CHUNK
    mask = torch.ones_like(ids)
    whole, split = CompressedCache(recipe), CompressedCache(recipe)
    expected = strategy.prefill(model, whole, ids, mask, CHUNK)
    for start, stop in ((0, 2 * CHUNK), (2 * CHUNK, 3 * CHUNK), (3 * CHUNK, ids.shape[1])):
        logits = strategy.prefill(model, split, ids, mask, CHUNK, start=start, stop=stop)
    assert torch.equal(logits, expected) and split.nbytes() == whole.nbytes()
    tensors, meta = split.state_dict()
    expected_tensors, expected_meta = whole.state_dict()
    assert meta == expected_meta and tensors.keys() == expected_tensors.keys()
    assert all(torch.equal(tensors[name], expected_tensors[name]) for name in tensors)


def test_a_reconstruction_pass_cannot_be_fed_in_pieces(tiny):
    model, tokenizer = tiny
    strategy = Recipe.parse("kvzip@0.5").prefill_strategy(tokenizer)
    assert not strategy.feeds_in_pieces
    ids = torch.tensor([tokenizer.encode("The pass key is 4417093. " * 4)])
    with pytest.raises(ValueError, match="cannot be fed in pieces"):
        strategy.prefill(
            install(model), CompressedCache(Recipe.parse("kvzip@0.5")), ids, ids, CHUNK, stop=CHUNK
        )


def test_words_are_kept_whole_in_the_server_as_in_the_engine(tiny):
    model, tokenizer = tiny
    install(model)
    recipe = Recipe.parse("knorm+words@0.5")
    context = tokenizer.encode("The pass key is 4417093, not 51. " * 5)
    seq = Sequence(context=context, prompt=tokenizer.encode(" Key?"), max_tokens=4, sink=Collector())
    runner = Runner(model, recipe, kv_memory=1 << 30, chunk_size=CHUNK, tokenizer=tokenizer)
    run_until_done(runner, [seq])
    assert seq.sink.tokens == reference(model, recipe, seq.context, seq.prompt, 4, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        Runner(model, recipe, kv_memory=1 << 30)


def test_kvzip_in_the_server_answers_as_the_engine_and_budgets_its_reconstruction_peak(tiny, monkeypatch):
    """The whole context, then the reconstruction pass, in the runner as in the engine; a stored
    context is reused without a second pass; admission covers what the cache holds just before
    the copy is cropped."""
    model, tokenizer = tiny
    install(model)
    recipe = Recipe.parse("kvzip+words@0.5")
    context = tokenizer.encode("The museum opens at nine. The pass key is 4417093. " * 4)
    peaks = []
    crop = CompressedCache.crop

    def recording(cache, tokens_to_remove):
        peaks.append(cache.nbytes())
        crop(cache, tokens_to_remove)

    monkeypatch.setattr(CompressedCache, "crop", recording)
    runner = Runner(model, recipe, kv_memory=1 << 30, chunk_size=CHUNK, tokenizer=tokenizer)
    assert runner.prefix_cache is None
    stored = Sequence(context=context, prompt=[], max_tokens=1, sink=Collector(), kind="context")
    run_until_done(runner, [stored])
    entry = next(value for event, value in stored.sink.events if event == "context")
    fresh, restored = (
        Sequence(
            context=context, prompt=tokenizer.encode(question), max_tokens=4, sink=Collector(), restored=saved
        )
        for question, saved in ((" Key?", None), (" When does it open?", entry))
    )
    run_until_done(runner, [fresh, restored])
    assert len(peaks) == 2  # the stored context and the fresh request; the restored one skips the pass
    for seq in (fresh, restored):
        assert seq.sink.tokens == reference(model, recipe, seq.context, seq.prompt, 4, tokenizer=tokenizer)
    # more than a chunked prefill ever holds (the whole context), within what admission reserves
    assert runner.bytes_needed_alone(len(context), 0, 0) >= max(peaks) > runner.token_bytes * len(context)
    with pytest.raises(ValueError, match="tokenizer"):
        Runner(model, recipe, kv_memory=1 << 30)


def test_the_server_refuses_a_kvzip_context_only_with_no_room_for_a_piece_of_copy(tiny):
    model, tokenizer = tiny
    server = Server(ServeConfig(model_name="tiny", recipe="kvzip@0.5"), model, tokenizer)
    longest = server.max_length - server.runner.strategy.positions_needed(0) - SMALLEST_CHUNK
    server.check_size(server.max_length // 2 + 1, 8, 8)  # more than half the window
    server.check_size(longest, 8, 8)
    with pytest.raises(APIError, match="shorten the context by 1 tokens"):
        server.check_size(longest + 1, 8, 8)
    Server(ServeConfig(model_name="tiny", recipe="snapkv@0.5"), model, tokenizer).check_size(
        longest + 1, 8, 8
    )


@pytest.mark.parametrize("step_tokens", [1, 4 * CHUNK])
def test_small_budget_waits_and_preempts_without_mixing_answers(step_tokens):
    """Prefills fed a chunk a step (preempted while carried over too) or whole."""
    model = install(tiny_model("llama"))
    recipe = Recipe.parse("knorm@0.5")
    probe = Runner(model, recipe, kv_memory=1 << 30, chunk_size=CHUNK)
    specs = [(16, 4, 12), (16, 6, 12), (24, 3, 12), (8, 5, 12), (16, 2, 12)]
    # room for about two requests at a time, so others wait and growing rows get preempted
    budget = probe.bytes_needed_alone(24, 3, 12) * 2
    runner = Runner(model, recipe, kv_memory=budget, chunk_size=CHUNK, max_step_tokens=step_tokens)
    seqs = make_requests(specs)
    peak = 0
    for seq in seqs:
        runner.submit(seq)
    for _ in range(500):
        runner.step()
        peak = max(peak, runner.used())
        if all(seq.sink.done for seq in seqs):
            break
    for seq in seqs:
        assert seq.sink.tokens == reference(model, recipe, seq.context, seq.prompt, seq.max_tokens)
    assert peak <= budget
    assert runner.stats.max_running < len(seqs)
    assert runner.stats.preemptions > 0


def test_prefix_reuse_resumes_from_the_longest_saved_boundary():
    model = install(tiny_model("llama"))
    recipe = Recipe.parse("knorm@0.5")
    prefix = PrefixCache(1 << 30, CHUNK, "tiny", str(recipe), "float32")
    runner = Runner(model, recipe, kv_memory=1 << 30, chunk_size=CHUNK, prefix_cache=prefix)
    shared = tokens(7, 3 * CHUNK)
    first = Sequence(context=shared + tokens(8, 5), prompt=tokens(9, 4), max_tokens=5, sink=Collector())
    second = Sequence(context=shared + tokens(10, 11), prompt=tokens(11, 3), max_tokens=5, sink=Collector())
    run_until_done(runner, [first])
    run_until_done(runner, [second])
    assert first.sink.done["cached_tokens"] == 0
    assert second.sink.done["cached_tokens"] == 3 * CHUNK
    for seq in (first, second):
        assert seq.sink.tokens == reference(model, recipe, seq.context, seq.prompt, seq.max_tokens)
    other_scope = Sequence(context=first.context, prompt=first.prompt, max_tokens=5, sink=Collector())
    other_scope.scope = "someone-else"
    run_until_done(runner, [other_scope])
    assert other_scope.sink.done["cached_tokens"] == 0


def test_the_same_context_again_is_reused_whole_partial_last_chunk_included():
    """Another question on the same context (its partial last chunk too) resumes from the state
    saved at the context's end; a context that only starts with it resumes at a chunk boundary."""
    model = install(tiny_model("llama"))
    recipe = Recipe.parse("knorm@0.5")
    prefix = PrefixCache(1 << 30, CHUNK, "tiny", str(recipe), "float32")
    runner = Runner(model, recipe, kv_memory=1 << 30, chunk_size=CHUNK, prefix_cache=prefix)
    context = tokens(7, 3 * CHUNK + 5)
    first = Sequence(context=context, prompt=tokens(9, 4), max_tokens=5, sink=Collector())
    again = Sequence(context=context, prompt=tokens(11, 3), max_tokens=5, sink=Collector())
    longer = Sequence(context=context + tokens(12, 2), prompt=tokens(9, 4), max_tokens=5, sink=Collector())
    for seq in (first, again, longer):
        run_until_done(runner, [seq])
    assert [seq.sink.done["cached_tokens"] for seq in (first, again, longer)] == [0, len(context), 3 * CHUNK]
    for seq in (again, longer):
        assert seq.sink.tokens == reference(model, recipe, seq.context, seq.prompt, seq.max_tokens)


def test_chain_hashes_chain_every_block_the_last_one_partial():
    assert len(chain_hashes(list(range(20)), 8)) == 3
    assert chain_hashes(list(range(16)), 8) == chain_hashes(list(range(20)), 8)[:2]
    assert chain_hashes(list(range(20)), 8)[2] != chain_hashes(list(range(21)), 8)[2]
    assert chain_hashes([1, *range(1, 16)], 8)[1] != chain_hashes(list(range(16)), 8)[1]


def test_a_prefill_carried_over_steps_can_be_cancelled_or_fail_alone(monkeypatch):
    """One chunk a step: a request cancelled halfway through its prefill, and one whose fourth
    chunk raises, end alone; the decoding row and the next request answer as alone."""
    model = install(tiny_model("llama"))
    recipe = Recipe.parse("knorm@0.5")
    runner = Runner(model, recipe, kv_memory=1 << 30, chunk_size=CHUNK, max_step_tokens=CHUNK + 1)
    running, cancelled, failing, later = make_requests(
        [(10, 3, 10), (4 * CHUNK, 2, 4), (5 * CHUNK, 2, 4), (9, 2, 4)]
    )
    runner.submit(running)
    runner.step()
    runner.submit(cancelled)
    runner.step()
    runner.step()
    assert runner.in_flight() == 2 and cancelled.sink.tokens == []
    runner.cancel(cancelled)
    runner.step()
    assert cancelled.sink.done["finish_reason"] == "cancelled" and runner.in_flight() == 1
    poisoned = Poisoned(model.forward, limit=3 * CHUNK)  # the running row stays below
    monkeypatch.setattr(model, "forward", poisoned)
    runner.submit(failing)
    runner.submit(later)
    for _ in range(4):
        runner.step()
    monkeypatch.undo()
    (error,) = [value for event, value in failing.sink.events if event == "error"]
    assert error == "prefill failed: injected failure" and poisoned.raised == 1
    run_until_done(runner, [])
    assert len(running.sink.tokens) > 5  # it decoded at every step meanwhile
    for seq in (running, later):
        assert seq.sink.tokens == reference(model, recipe, seq.context, seq.prompt, seq.max_tokens)
    assert runner.cache is None and not runner.in_flight()


def test_cancel_removes_the_row_and_others_continue():
    model = install(tiny_model("llama"))
    recipe = Recipe.parse("full")
    runner = Runner(model, recipe, kv_memory=1 << 30, chunk_size=CHUNK)
    seqs = make_requests([(10, 3, 20), (12, 4, 6)])
    for seq in seqs:
        runner.submit(seq)
    runner.step()
    runner.cancel(seqs[0])
    for _ in range(20):
        runner.step()
    assert seqs[0].sink.done["finish_reason"] == "cancelled"
    assert seqs[1].sink.tokens == reference(model, recipe, seqs[1].context, seqs[1].prompt, 6)


def test_a_prefill_is_fed_within_each_step_s_tokens_and_resumes_in_the_next_step():
    """Two chunks a step next to one decoding row: a 5-chunk context and its prompt take three
    steps (16, 16, then 8 + 4), the row decodes at every one; one chunk a step at the least."""
    model = install(tiny_model("llama"))
    recipe = Recipe.parse("knorm@0.5")
    runner = Runner(model, recipe, kv_memory=1 << 30, chunk_size=CHUNK, max_step_tokens=2 * CHUNK + 1)
    first, second = make_requests([(10, 3, 12), (5 * CHUNK, 4, 6)])
    runner.submit(first)
    runner.step()
    runner.submit(second)
    fed = []
    for _ in range(3):
        runner.step()
        fed.append(runner.stats.step_prefill_tokens)
    assert fed == [2 * CHUNK, 2 * CHUNK, CHUNK + 4]
    assert [seq.id for seq in runner.scheduler.running] == [first.id, second.id]
    assert len(first.sink.tokens) == 5 and len(second.sink.tokens) == 2
    for _ in range(12):
        runner.step()
    tight = Runner(model, recipe, kv_memory=1 << 30, chunk_size=CHUNK, max_step_tokens=1)
    third = make_requests([(3 * CHUNK, 2, 3)])[0]
    run_until_done(tight, [third])
    assert tight.stats.max_step_prefill_tokens == CHUNK
    for seq in (first, second, third):
        assert seq.sink.tokens == reference(model, recipe, seq.context, seq.prompt, seq.max_tokens)


def test_a_4k_prompt_joining_does_not_stall_the_decoding_streams_and_answers_as_alone():
    """Sarathi-Serve's stall: four streams decoding, then a ~4k-token prompt joins. Between two
    tokens of a stream the model runs at most one step's tokens (a step: <= ``max_step_tokens``,
    prefill included), where prefilling the whole prompt in one step ran 4k; the prompt, fed in
    pieces over several steps, answers as it does alone."""
    model = install(tiny_model("llama", max_position_embeddings=8192))
    recipe = Recipe.parse("snapkv:window=4@0.5")
    budget, chunk = 1024, 256
    runner = Runner(model, recipe, kv_memory=1 << 30, chunk_size=chunk, max_step_tokens=budget)
    streams = make_requests([(21, 3, 24), (0, 9, 24), (13, 5, 24), (30, 4, 24)])
    long = Sequence(context=tokens(1, 4000), prompt=tokens(2, 8), max_tokens=6, sink=Collector())
    emitted, work, prefilled = [], [], []
    for step in range(40):
        for seq in streams if step == 0 else [long] if step == 2 else []:
            runner.submit(seq)
        before = runner.stats.prefill_tokens + runner.stats.decode_tokens
        rows = len(runner.scheduler.running)
        runner.step()
        work.append(runner.stats.prefill_tokens + runner.stats.decode_tokens - before)
        prefilled.append((runner.stats.step_prefill_tokens, rows))
        emitted.append([len(seq.sink.tokens) for seq in [*streams, long]])
        if all(seq.sink.ended for seq in [*streams, long]):
            break
    joined = next(step for step, counts in enumerate(emitted) if counts[-1])
    assert len(prefilled) > 8 and all(fed <= budget - rows for fed, rows in prefilled)
    for index in range(len(streams)):
        counts = [0] + [row[index] for row in emitted]
        steps = [step for step in range(len(emitted)) if counts[step + 1] > counts[step]]
        assert [b - a for a, b in itertools.pairwise(steps)] == [1] * (len(steps) - 1)
        # what the model ran between two tokens of the stream: one step's tokens at most
        assert max(sum(work[a + 1 : b + 1]) for a, b in itertools.pairwise(steps)) <= budget
    assert sum(fed for fed, _ in prefilled) == len(long.context) + len(long.prompt) + sum(
        len(seq.context) + len(seq.prompt) for seq in streams
    )
    assert joined >= 2 + 5  # 4008 tokens, 3 chunks (768) a step next to 4 decoding rows
    assert long.sink.tokens == reference(model, recipe, long.context, long.prompt, 6, chunk=chunk)
    for seq in streams:
        assert seq.sink.tokens == reference(
            model, recipe, seq.context, seq.prompt, seq.max_tokens, chunk=chunk
        )


@pytest.mark.parametrize(
    ("recipe", "long_part"),
    [
        *((recipe, "prompt") for recipe in ("kivi2", "kivi4", "gear", "snapkv+mixed@0.75", "h2o@0.5")),
        ("kivi2", "context"),
        ("h2o@0.5", "context"),
    ],
)
def test_a_short_request_joining_a_long_quantized_or_stateful_row_completes_both(recipe, long_part):
    """Issue 13's server killer: a ~1k-token request decoding, then a short one joins the batch
    (stacking a long quantized row, or one with H2O's accumulated scores, with a short one)."""
    model = install(tiny_model("llama", max_position_embeddings=2048))
    recipe = Recipe.parse(recipe)
    runner = Runner(model, recipe, kv_memory=1 << 30, chunk_size=256)
    head = tokens(9, 20)  # what a chat template puts before the user message
    document = tokens(1, 1000)
    context, prompt = (head, document) if long_part == "prompt" else (document, tokens(2, 20))
    long = Sequence(context=context, prompt=prompt, max_tokens=12, sink=Collector())
    short = Sequence(context=head, prompt=tokens(3, 3), max_tokens=8, sink=Collector())
    run_until_done(runner, [long, short], arrivals=[0, 2])
    for seq in (long, short):
        assert seq.sink.tokens == reference(model, recipe, seq.context, seq.prompt, seq.max_tokens, chunk=256)
        assert seq.sink.done["finish_reason"] == "length"
    assert runner.stats.max_running == 2 and runner.cache is None


class Poisoned:
    """A model forward that raises once a forward reaches position ``limit`` (only one request is
    that long), as a bug or a bad input inside the model would."""

    def __init__(self, forward, limit):
        self.forward, self.limit, self.raised = forward, limit, 0

    def __call__(self, *args, position_ids=None, past_key_values=None, input_ids=None, **kwargs):
        end = (
            int(position_ids.max()) + 1
            if position_ids is not None
            else past_key_values.get_seq_length() + input_ids.shape[1]
        )
        if end > self.limit:
            self.raised += 1
            raise RuntimeError("injected failure")
        return self.forward(
            *args, position_ids=position_ids, past_key_values=past_key_values, input_ids=input_ids, **kwargs
        )


def test_a_request_that_fails_inside_the_batched_decode_fails_alone(monkeypatch):
    model = install(tiny_model("llama"))
    recipe = Recipe.parse("full")
    runner = Runner(model, recipe, kv_memory=1 << 30, chunk_size=CHUNK)
    seqs = make_requests([(10, 3, 8), (30, 4, 8), (12, 4, 8)])
    poisoned = Poisoned(model.forward, limit=30 + 4 + 2)  # the second one's third decode step
    monkeypatch.setattr(model, "forward", poisoned)
    run_until_done(runner, seqs, arrivals=[0, 0, 1])
    (error,) = [value for event, value in seqs[1].sink.events if event == "error"]
    assert "injected failure" in error and seqs[1].sink.done is None
    monkeypatch.undo()
    for seq in (seqs[0], seqs[2]):
        assert seq.sink.tokens == reference(model, recipe, seq.context, seq.prompt, seq.max_tokens)
    assert poisoned.raised >= 2  # in the batch, then alone
    assert runner.cache is None and not runner.scheduler.has_work()


def test_a_step_that_raises_outside_the_model_fails_the_batch_and_the_next_requests_run(monkeypatch):
    """The first wave's failure: ``stack`` raised as a request joined, then its recovery raised
    too. Now the running row and the joining one fail with the reason; the worker goes on."""
    model = install(tiny_model("llama"))
    runner = Runner(model, Recipe.parse("full"), kv_memory=1 << 30, chunk_size=CHUNK)
    running, joining, later = make_requests([(10, 3, 400), (12, 4, 8), (9, 2, 4)])
    runner.start()
    try:
        runner.submit(running)
        wait_for(lambda: len(running.sink.tokens) > 1, 30, "decoding")

        def broken(caches):
            raise RuntimeError("cannot stack")

        monkeypatch.setattr(CompressedCache, "stack", broken)
        runner.submit(joining)
        wait_for(lambda: running.sink.ended and joining.sink.ended, 30, "both to fail")
        monkeypatch.undo()
        for seq in (running, joining):
            assert seq.sink.events[-1] == (
                "error",
                "internal error in the model runner: RuntimeError: cannot stack",
            )
        runner.submit(later)
        wait_for(lambda: later.sink.done, 30, "the next request")
        assert later.sink.done["completion_tokens"] == 4 and runner.alive
    finally:
        runner.stop()


def test_a_decoding_component_bounds_every_row_of_the_running_batch():
    """Rows join at different steps (each join stacks the batch anew) and still get compressed
    every ``every`` steps; admission reserves the bounded answer, not max_tokens of it."""
    model = install(tiny_model("qwen2"))
    recipe = Recipe.parse("decode:budget=12,every=4,frozen=true")
    runner = Runner(model, recipe, kv_memory=1 << 30, chunk_size=CHUNK)
    seqs = make_requests([(21, 3, 40), (0, 9, 40), (13, 5, 40)])
    arrivals, held = [0, 3, 6], []
    for step in range(200):
        for seq, at in zip(seqs, arrivals, strict=True):
            if at == step:
                runner.submit(seq)
        runner.step()
        if runner.cache is not None:
            held.append([runner.cache.held_tokens(row) for row in range(len(runner.scheduler.running))])
        if all(seq.sink.ended for seq in seqs):
            break
    layers_heads = runner.entries_per_token
    for seq in seqs:
        assert seq.sink.done["completion_tokens"] == 40
    prompt_held = [c + p for c, p, _ in [(21, 3, 40), (0, 9, 40), (13, 5, 40)]]
    assert max(max(rows) for rows in held) <= (max(prompt_held) + 12 + 4) * layers_heads
    bounded = runner.bytes_needed_alone(21, 3, 4000)
    unbounded = Runner(model, Recipe.parse("full"), kv_memory=1 << 30).bytes_needed_alone(21, 3, 4000)
    assert bounded < unbounded / 50
