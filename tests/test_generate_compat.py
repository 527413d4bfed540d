"""``CompressedCache`` keeps transformers' ``Cache`` semantics, as ``generate`` uses them (5.23).

Public APIs only (``CompressedCache``, ``Recipe``, ``install``, ``DynamicCache``, ``generate``), so
the file stays valid across a rewrite of the cache's storage. What ``generate`` calls on the cache:

- every mode: ``get_seq_length`` (prefill slicing), ``get_mask_sizes`` (mask sizes), ``update``;
- greedy and sampling (``_sample``): nothing else;
- beam search (``_beam_search``): the prompt is repeated ``num_beams`` times *before* the prefill, so
  no ``batch_repeat_interleave``; ``reorder_cache(beam_idx)`` after every step;
- assisted decoding and prompt lookup (``_assisted_decoding``, batch 1 only):
  ``activate_past_recording()`` once, then ``crop(-n)`` after every verification forward, ``n`` the
  rejected candidates (``crop(0)`` included). ``crop`` takes a negative count and raises
  ``ValueError`` on a positive one;
- nothing in 5.23 calls ``batch_select_indices`` / ``batch_repeat_interleave`` (contrastive search,
  their last user, moved to a Hub repo); they are pinned here as part of the ``Cache`` API.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import pytest
import torch
from tiny_models import padded_batch, tiny_model
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from kvsqueeze import CompressedCache, Recipe, install

ARCHS = ("llama", "mistral")  # mistral: sliding window 12, shorter than every prompt here
ATOL = 1e-4
NEW_TOKENS = 6
SEED = 1234

MODES = {
    "greedy": {"do_sample": False},
    "sampling": {"do_sample": True, "top_k": 20, "temperature": 0.8},
    "beam_search": {"do_sample": False, "num_beams": 3, "num_return_sequences": 2},
}
ROLLBACK_MODES = {"assisted": {"assistant": True}, "prompt_lookup": {"prompt_lookup_num_tokens": 3}}
COMPRESSED_RECIPES = ("snapkv@0.5", "kivi2", "snapkv+kivi4@0.5")

# --- models, prompts and caches ---------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny matmuls: with a second thread on a busy machine a 6-token generate takes 3 s, not 0.06 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def models(arch: str) -> tuple[PreTrainedModel, PreTrainedModel]:
    """The same weights twice: on plain SDPA (the reference) and with kvsqueeze installed.

    No EOS token, so every generation runs its full length and shapes are exact.
    """
    reference, installed = tiny_model(arch), install(tiny_model(arch))
    for model in (reference, installed):
        model.generation_config.eos_token_id = None
    return reference, installed


@functools.cache
def assistant(arch: str) -> PreTrainedModel:
    """A 1-layer model with other weights and the same vocabulary: it drafts exactly 3 tokens each
    round (constant schedule, no confidence stop), so the main model rejects some of them."""
    model = tiny_model(arch, seed=7, layers=1)
    model.generation_config.eos_token_id = None
    model.generation_config.num_assistant_tokens = 3
    model.generation_config.num_assistant_tokens_schedule = "constant"
    model.generation_config.assistant_confidence_threshold = 0.0
    return model


def prompt(batch: int, length: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask; a second row is ``length - 5`` tokens, left-padded."""
    return padded_batch([length, length - 5][:batch], seed=seed)


def repetitive_prompt() -> tuple[torch.Tensor, torch.Tensor]:
    """One row of a random 7-token phrase said three times: prompt lookup finds n-grams to copy."""
    phrase, _ = padded_batch([7], seed=3)
    ids = phrase.repeat(1, 3)
    return ids, torch.ones_like(ids)


def compressed(recipe: str = "full") -> CompressedCache:
    return CompressedCache(Recipe.parse(recipe))


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` derives them from a left-padded mask."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


# --- generate ---------------------------------------------------------------------------------


def generate(
    model: PreTrainedModel, cache: Cache, ids: torch.Tensor, mask: torch.Tensor, **kwargs
) -> ModelOutput:
    torch.manual_seed(SEED)
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        past_key_values=cache,
        max_new_tokens=NEW_TOKENS,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        **kwargs,
    )


def mode_kwargs(arch: str, mode: dict) -> dict:
    kwargs = dict(mode)
    if kwargs.pop("assistant", False):
        kwargs["assistant_model"] = assistant(arch)
    return kwargs


def generate_both(
    arch: str, ids: torch.Tensor, mask: torch.Tensor, **kwargs
) -> tuple[ModelOutput, ModelOutput]:
    """The same generation with ``DynamicCache`` (plain SDPA) and ``CompressedCache("full")``."""
    reference_model, model = models(arch)
    reference = generate(reference_model, DynamicCache(config=reference_model.config), ids, mask, **kwargs)
    return reference, generate(model, compressed(), ids, mask, **kwargs)


def assert_same_generation(out: ModelOutput, reference: ModelOutput) -> None:
    """Same tokens, scores and raw logits (and beam scores, beam indices), same cache length."""
    assert torch.equal(out.sequences, reference.sequences)
    for field in ("scores", "logits"):
        got, expected = getattr(out, field), getattr(reference, field)
        assert len(got) == len(expected) == NEW_TOKENS
        torch.testing.assert_close(torch.stack(got), torch.stack(expected), atol=ATOL, rtol=0)
    if "sequences_scores" in reference:
        torch.testing.assert_close(out.sequences_scores, reference.sequences_scores, atol=ATOL, rtol=0)
        assert torch.equal(out.beam_indices, reference.beam_indices)
    assert out.past_key_values.get_seq_length() == reference.past_key_values.get_seq_length()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("arch", ARCHS)
def test_generate_matches_dynamic_cache(arch: str, batch: int, mode: str) -> None:
    ids, mask = prompt(batch)
    reference, out = generate_both(arch, ids, mask, **MODES[mode])
    rows = batch * MODES[mode].get("num_return_sequences", 1)
    assert out.sequences.shape == (rows, ids.shape[1] + NEW_TOKENS)
    assert_same_generation(out, reference)


@pytest.mark.parametrize("mode", list(ROLLBACK_MODES))
@pytest.mark.parametrize("arch", ARCHS)
def test_rollback_generate_matches_dynamic_cache(arch: str, mode: str) -> None:
    ids, mask = repetitive_prompt()
    reference, out = generate_both(
        arch, ids, mask, do_sample=False, **mode_kwargs(arch, ROLLBACK_MODES[mode])
    )
    assert_same_generation(out, reference)


class RecordingCache(DynamicCache):
    """A ``DynamicCache`` that records the rollback, batch and past-recording calls made on it."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[tuple[str, int | list[int] | None]] = []

    def _record(self, name: str, argument: int | torch.Tensor | None = None) -> None:
        self.calls.append((name, argument.tolist() if isinstance(argument, torch.Tensor) else argument))

    def activate_past_recording(self) -> None:
        self._record("activate_past_recording")
        super().activate_past_recording()

    def crop(self, tokens_to_remove: int) -> None:
        self._record("crop", tokens_to_remove)
        super().crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._record("reorder_cache", beam_idx)
        super().reorder_cache(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._record("batch_select_indices", indices)
        super().batch_select_indices(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._record("batch_repeat_interleave", repeats)
        super().batch_repeat_interleave(repeats)


@pytest.mark.parametrize("mode", list(MODES) + list(ROLLBACK_MODES))
def test_generate_calls_these_cache_methods(mode: str) -> None:
    """What the other tests rely on: which cache methods ``generate`` calls in each mode."""
    model, _ = models("llama")
    rollback = mode in ROLLBACK_MODES
    ids, mask = repetitive_prompt() if rollback else prompt(2)
    kwargs = mode_kwargs("llama", ROLLBACK_MODES[mode] if rollback else MODES[mode])
    cache = RecordingCache(config=model.config)
    generate(model, cache, ids, mask, **({"do_sample": False} if rollback else {}), **kwargs)
    names = [name for name, _ in cache.calls]
    if rollback:
        assert names[0] == "activate_past_recording" and set(names[1:]) == {"crop"}
        counts = [n for _, n in cache.calls[1:]]
        assert all(n <= 0 for n in counts) and min(counts) < 0  # something was rolled back
    elif mode == "beam_search":
        assert names == ["reorder_cache"] * NEW_TOKENS
        assert all(len(beams) == 2 * 3 for _, beams in cache.calls)
    else:
        assert names == []


# --- the cache API, call by call --------------------------------------------------------------


def forward(model: PreTrainedModel, cache: Cache, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Feed ``ids`` (the last ``ids.shape[1]`` columns of ``mask``); logits ``[B, q, V]``."""
    with torch.no_grad():
        new_positions = positions(mask)[:, -ids.shape[1] :]
        out = model(input_ids=ids, attention_mask=mask, position_ids=new_positions, past_key_values=cache)
    return out.logits


def prefilled(arch: str, batch: int) -> tuple[list[tuple[PreTrainedModel, Cache]], torch.Tensor]:
    """``[(reference model, DynamicCache), (installed model, CompressedCache)]`` both fed
    ``prompt(batch)``, past recording on (sliding layers can then roll back, as in assisted
    decoding); and the prompt's mask."""
    reference_model, model = models(arch)
    ids, mask = prompt(batch)
    pairs: list[tuple[PreTrainedModel, Cache]] = [
        (reference_model, DynamicCache(config=reference_model.config)),
        (model, compressed()),
    ]
    for each_model, cache in pairs:
        cache.activate_past_recording()
        forward(each_model, cache, ids, mask)
    return pairs, mask


def next_tokens(rows: int, count: int = 2) -> torch.Tensor:
    return torch.randint(3, 96, (rows, count), generator=torch.Generator().manual_seed(5))


def extended(mask: torch.Tensor, count: int) -> torch.Tensor:
    return torch.cat([mask, mask.new_ones(mask.shape[0], count)], dim=1)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("arch", ARCHS)
def test_crop_negative_removes_the_last_tokens(arch: str, batch: int) -> None:
    pairs, mask = prefilled(arch, batch)
    removed = 3
    kept_mask = extended(mask[:, :-removed], 2)
    logits = []
    for model, cache in pairs:
        cache.crop(-removed)
        assert cache.get_seq_length() == mask.shape[1] - removed
        logits.append(forward(model, cache, next_tokens(batch), kept_mask))
        # crop(0) keeps the length (a sliding layer also drops what it recorded: one rollback per step)
        cache.crop(0)
        assert cache.get_seq_length() == mask.shape[1] - removed + 2
    torch.testing.assert_close(logits[1], logits[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "make_cache",
    [
        pytest.param(DynamicCache, id="dynamic"),  # DynamicLayer; a sliding layer raises RuntimeError
        pytest.param(compressed, id="compressed"),
    ],
)
@pytest.mark.parametrize("arch", ARCHS)
def test_crop_positive_raises_and_keeps_everything(arch: str, make_cache: Callable[[], Cache]) -> None:
    _, model = models(arch)
    ids, mask = prompt(2)
    cache = make_cache()
    forward(model, cache, ids, mask)
    with pytest.raises(ValueError):
        cache.crop(2)
    assert cache.get_seq_length() == ids.shape[1]


BATCH_OPS: dict[str, list[tuple[str, torch.Tensor | int]]] = {
    "reorder_cache": [("reorder_cache", torch.tensor([1, 0]))],
    "reorder_cache_duplicating": [("reorder_cache", torch.tensor([1, 1]))],
    "batch_select_indices": [("batch_select_indices", torch.tensor([1]))],
    "batch_repeat_interleave": [("batch_repeat_interleave", 3)],
    "repeat_then_reorder": [("batch_repeat_interleave", 2), ("reorder_cache", torch.tensor([3, 0, 2, 2]))],
}


def rows_after(ops: list[tuple[str, torch.Tensor | int]], batch: int) -> torch.Tensor:
    """Which original row each row of the cache holds after ``ops``."""
    rows = torch.arange(batch)
    for name, argument in ops:
        rows = rows.repeat_interleave(argument) if name == "batch_repeat_interleave" else rows[argument]
    return rows


@pytest.mark.parametrize("op", list(BATCH_OPS))
@pytest.mark.parametrize("arch", ARCHS)
def test_batch_ops_then_decode_match_dynamic_cache(arch: str, op: str) -> None:
    pairs, mask = prefilled(arch, 2)
    rows = rows_after(BATCH_OPS[op], 2)
    tokens, mask = next_tokens(2)[rows], mask[rows]
    logits = []
    for model, cache in pairs:
        for name, argument in BATCH_OPS[op]:
            getattr(cache, name)(argument)
        steps = [forward(model, cache, tokens[:, :1], extended(mask, 1))]
        steps.append(forward(model, cache, tokens[:, 1:], extended(mask, 2)))
        logits.append(torch.cat(steps, dim=1))
        assert cache.get_seq_length() == mask.shape[1] + 2
    assert logits[1].shape[0] == len(rows)
    torch.testing.assert_close(logits[1], logits[0], atol=ATOL, rtol=0)


# --- compressing recipes ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["greedy", "beam_search", "assisted"])
@pytest.mark.parametrize("recipe", COMPRESSED_RECIPES)
def test_compressed_recipe_generates(recipe: str, mode: str) -> None:
    """Runs and returns the right shapes. The prompts are long enough for SnapKV to evict and KIVI
    to quantize (its default group 32 and residual 32 quantize nothing below 64 held tokens, and
    its 16-bit residual alone is no smaller than a 16-bit full cache): the cache ends smaller."""
    _, model = models("llama")
    batch = 1 if mode == "assisted" else 2
    ids, mask = prompt(batch, length=140)
    kwargs = mode_kwargs("llama", ROLLBACK_MODES["assisted"]) if mode == "assisted" else MODES[mode]
    cache = compressed(recipe)
    out = generate(model, cache, ids, mask, **{"do_sample": False, **kwargs})
    rows = batch * kwargs.get("num_return_sequences", 1)
    assert out.sequences.shape == (rows, ids.shape[1] + NEW_TOKENS)
    repeats = kwargs.get("num_return_sequences", 1)
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids.repeat_interleave(repeats, dim=0))
    assert len(out.scores) == NEW_TOKENS
    vocab = model.config.vocab_size
    assert all(step.shape == (batch * kwargs.get("num_beams", 1), vocab) for step in out.scores)
    assert bool(torch.isfinite(torch.stack(out.logits)).all())
    assert out.past_key_values is cache
    assert cache.nbytes(torch.float16) < cache.nbytes_full(torch.float16)
