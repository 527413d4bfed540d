"""The ``sliding`` component: recipes compress sliding-window layers only when asked, and a recipe
that would compress nothing (every layer slides) is refused by the CLI and the server, warned
about by the Python API."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

from kvsqueeze import CompressedCache, install
from kvsqueeze.cli import main
from kvsqueeze.engine import generate
from kvsqueeze.recipe import Recipe, RecipeError

CONTEXT = "The pass key is 12345. Remember it. " + "The grass is green. The sky is blue. " * 8
QUESTION = "What is the pass key?"
WINDOW = 160


@pytest.fixture(scope="module")
def mistral(tokenizer):
    """Tiny Mistral over the real vocabulary: both layers slide over a 160-token window."""
    model = tiny_model("mistral", vocab_size=len(tokenizer), sliding_window=WINDOW)
    return install(model), tokenizer


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("snapkv+sliding@0.75", "snapkv+sliding@0.75"),
        ("sliding+kivi4", "kivi4+sliding"),
        ("kvzip+global+kivi4@0.75+sliding", "kvzip+global+kivi4+sliding@0.75"),
    ],
)
def test_sliding_parses_and_prints_back(text, canonical):
    recipe = Recipe.parse(text)
    assert recipe.layers is not None and str(recipe) == canonical
    assert str(Recipe.parse(canonical)) == canonical


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sliding", "add what to apply, e.g. snapkv+sliding@0.75"),
        ("snapkv+sliding", "needs a ratio"),
        ("full+sliding", "'full' keeps everything and stands alone"),
        ("snapkv+sliding+sliding@0.5", "two layerss"),
    ],
)
def test_sliding_without_anything_to_apply_is_a_recipe_error(text, message):
    with pytest.raises(RecipeError, match=message.replace("+", r"\+").replace(".", r"\.")):
        Recipe.parse(text)


def test_a_recipe_without_sliding_misses_a_model_whose_every_layer_slides(mistral):
    model, _ = mistral
    reason = Recipe.parse("snapkv@0.75").misses_every_layer(model.config)
    assert "all 2 layers are sliding-window layers (window 160)" in reason
    assert reason.endswith("e.g. snapkv+sliding@0.75")
    assert Recipe.parse("snapkv+sliding@0.75").misses_every_layer(model.config) is None
    assert Recipe.parse("full").misses_every_layer(model.config) is None
    llama = tiny_model("llama")
    assert Recipe.parse("snapkv@0.75").misses_every_layer(llama.config) is None


def _held_per_layer(cache: CompressedCache) -> list[int]:
    return [int(layer.held_lengths().max()) for layer in cache.layers]


def test_sliding_compresses_every_layer_of_an_all_sliding_model(mistral):
    model, tokenizer = mistral
    full = generate(model, tokenizer, CONTEXT, QUESTION, "full", max_new_tokens=4)
    with pytest.warns(UserWarning, match="compresses no layer of this model"):
        untouched = generate(model, tokenizer, CONTEXT, QUESTION, "snapkv@0.5", max_new_tokens=4)
    compressed = generate(model, tokenizer, CONTEXT, QUESTION, "snapkv+sliding@0.5", max_new_tokens=4)
    assert untouched.compressed_layers == [] and untouched.kv_bytes == full.kv_bytes
    assert compressed.compressed_layers == [0, 1] and compressed.generated_tokens == 4
    # the prompt fits in the window: the full cache holds all of it, the recipe half the context
    assert full.tokens_kept == full.context_tokens + full.question_tokens < WINDOW
    assert compressed.tokens_kept < 0.5 * compressed.context_tokens + compressed.question_tokens + 1
    assert compressed.kv_bytes < 0.75 * full.kv_bytes


def test_sliding_layer_compressed_then_still_slides(mistral):
    """A compressed sliding layer keeps letting go of what left its window while decoding."""
    model, tokenizer = mistral
    cache = CompressedCache(Recipe.parse("streaming:sinks=0+sliding@0.5"), config=model.config)
    ids = torch.tensor([tokenizer.encode(CONTEXT, add_special_tokens=False)[: WINDOW - 4]])
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache)
        held_after_prefill = _held_per_layer(cache)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(WINDOW):
            token = model(input_ids=token, past_key_values=cache).logits[:, -1:].argmax(-1)
    assert held_after_prefill == [(ids.shape[1] + 1) // 2] * 2
    seen = cache.get_seq_length()
    for layer in cache.layers:
        slots = layer.view().slots[0]
        assert int(slots[slots >= 0].min()) >= seen - WINDOW  # nothing older than the window
    assert max(_held_per_layer(cache)) < WINDOW - 1 + cache.block_size


def test_run_refuses_a_recipe_that_compresses_no_layer(mistral, monkeypatch, capsys):
    monkeypatch.setattr("kvsqueeze.cli.load_model", lambda *args, **kwargs: mistral)
    argv = ["run", "--context", CONTEXT, "--question", QUESTION, "--max-new-tokens", "1"]
    assert main([*argv, "--recipe", "snapkv@0.75"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: recipe snapkv@0.75 compresses no layer") and "Traceback" not in err
    assert main([*argv, "--recipe", "snapkv+sliding@0.75", "--json"]) == 0
    assert '"compressed_layers": [0, 1]' in capsys.readouterr().out


def test_serve_refuses_a_recipe_that_compresses_no_layer(mistral, monkeypatch, capsys):
    monkeypatch.setattr("kvsqueeze.models.load_model", lambda *args, **kwargs: mistral)
    assert main(["serve", "--recipe", "snapkv@0.75", "--port", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: recipe snapkv@0.75 compresses no layer")
