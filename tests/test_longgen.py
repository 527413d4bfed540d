"""Long-generation tasks: the traced decode loop, teacher forcing, segment metrics, the counting
rule, the two-turn prompt, and the tasks end to end through ``run_eval`` and the report."""

from __future__ import annotations

import json

import pytest
import torch

from kvsqueeze.attention import install
from kvsqueeze.cache import CompressedCache
from kvsqueeze.engine import decode, decode_trace, prefill_context
from kvsqueeze.eval import longgen
from kvsqueeze.eval.longgen import count_lines, count_score, segment_metrics, two_turn_prompt
from kvsqueeze.eval.report import summary_markdown
from kvsqueeze.eval.runner import EvalConfig, load_records, run_eval
from kvsqueeze.models import chat_prompt
from kvsqueeze.recipe import Recipe

PROMPT = "The lighthouse keeper counted the ships that passed the harbour every night. " * 6


def _prefilled(model, tokenizer, recipe: str):
    install(model)
    ids = torch.tensor([tokenizer.encode(PROMPT, add_special_tokens=False)])
    cache = CompressedCache(Recipe.parse(recipe), config=model.config)
    logits = prefill_context(model, tokenizer, cache, ids, torch.ones_like(ids))
    return cache, logits, torch.ones_like(ids)


def test_trace_is_greedy_decoding_and_forcing_it_back_is_exact(tiny):
    model, tokenizer = tiny
    cache, logits, mask = _prefilled(model, tokenizer, "full")
    greedy = decode(model, cache, logits, mask, set(), 20)[0]
    cache, logits, mask = _prefilled(model, tokenizer, "full")
    trace = decode_trace(model, cache, logits, mask, 20)
    assert trace.tokens == greedy
    assert trace.logits.shape == (20, model.config.vocab_size)
    assert trace.logits.argmax(-1).tolist() == greedy
    assert trace.kv_bytes == sorted(trace.kv_bytes) and trace.kv_bytes[0] < trace.kv_bytes[-1]

    cache, logits, mask = _prefilled(model, tokenizer, "full")
    forced = decode_trace(model, cache, logits, mask, 20, forced=trace.tokens)
    (segment,) = segment_metrics(trace, forced)
    assert segment["top1"] == 1.0 and segment["kl"] == pytest.approx(0.0, abs=1e-9)
    assert segment["end"] == 20 and segment["kv_bytes"] == trace.kv_bytes[-1]


def test_banned_tokens_are_never_chosen(tiny):
    model, tokenizer = tiny
    cache, logits, mask = _prefilled(model, tokenizer, "full")
    free = decode_trace(model, cache, logits, mask, 6)
    cache, logits, mask = _prefilled(model, tokenizer, "full")
    banned = decode_trace(model, cache, logits, mask, 6, banned={free.tokens[0]})
    assert banned.tokens[0] != free.tokens[0]
    assert free.tokens[0] not in banned.tokens
    with pytest.raises(ValueError, match="fewer than the 6 steps"):
        decode_trace(model, cache, logits, mask, 6, forced=[1, 2])


def test_a_decode_budget_bounds_every_step_and_moves_the_predictions(tiny):
    model, tokenizer = tiny
    steps, budget, every = 48, 16, 8
    cache, logits, mask = _prefilled(model, tokenizer, "full")
    full = decode_trace(model, cache, logits, mask, steps)
    recipe = f"decode:scorer=streaming,budget={budget},every={every}"
    cache, logits, mask = _prefilled(model, tokenizer, recipe)
    capped = decode_trace(model, cache, logits, mask, steps, forced=full.tokens)
    heads = len(cache.layers) * model.config.num_key_value_heads
    assert cache.tokens_kept() <= (budget + every) * heads
    assert max(capped.kv_bytes[every:]) < full.kv_bytes[-1] / 3
    (segment,) = segment_metrics(full, capped)
    assert segment["kl"] > 1e-4


def test_segments_split_the_answer(tiny, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setattr(longgen, "SEGMENT", 8)
    cache, logits, mask = _prefilled(model, tokenizer, "full")
    trace = decode_trace(model, cache, logits, mask, 20)
    assert [s["end"] for s in segment_metrics(trace, trace)] == [8, 16, 20]


def test_count_score_counts_right_lines_until_the_first_wrong_one():
    expected = count_lines(1005, 5, 4)
    assert expected == ["1005", "1010", "1015", "1020"]
    assert count_score("1005\n1010\n1015\n1020\n1025", expected) == 1.0
    assert count_score("1005\n1010\n1016\n1020", expected) == 0.5
    assert count_score(" 1005 \n1010", expected) == 0.5
    assert count_score("one thousand and five", expected) == 0.0


def test_two_turn_prompt_starts_as_one_turn_and_ends_at_the_second_answer(tokenizer):
    head, between = two_turn_prompt(tokenizer, "First question?", "Second question?")
    assert head == chat_prompt(tokenizer, "First question?")
    assert between.endswith(chat_prompt(tokenizer, "Second question?").rpartition("Second question?")[2])
    assert "Second question?" in between and "First question?" not in between


def test_two_turn_prompt_without_a_chat_template(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", None)
    head, between = two_turn_prompt(tokenizer, "Q1", "Q2", "The key is")
    assert head == chat_prompt(tokenizer, "Q1") and head.endswith("Q1\nAnswer:")
    assert between == "\n\nQ2\nAnswer: The key is"


def test_long_generation_tasks_run_end_to_end_and_report(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setattr(longgen, "SEGMENT", 8)
    capped = "decode:budget=8,every=4,scorer=streaming"  # as the recipe writes itself
    config = EvalConfig(recipes=[capped], tasks=["longgen"], lengths=[256], samples=1, longgen_tokens=20)
    assert run_eval(config, tmp_path, model, tokenizer) == {"ran": 6, "skipped": 0}
    records = {(r["task"], r["recipe"]): r for r in load_records(tmp_path)}
    fid_full, fid_capped = records[("longgen_fidelity", "full")], records[("longgen_fidelity", capped)]
    assert fid_full["top1"] == 1.0 and [s["end"] for s in fid_full["segments"]] == [8, 16, 20]
    assert fid_capped["kv_bytes_end"] < fid_full["kv_bytes_end"]
    assert fid_capped["kv_bytes_peak"] >= fid_capped["kv_bytes_end"]
    assert fid_capped["generated_tokens"] == 20 == fid_full["generated_tokens"]
    recall = records[("longgen_recall", capped)]
    assert recall["answers"] and 0.0 <= recall["score"] <= 1.0 and recall["prompt_tokens"] > 256 - 64
    count = records[("longgen_count", "full")]
    assert count["info"]["lines_due"] >= 3 and 0.0 <= count["score"] <= 1.0

    markdown = summary_markdown(load_records(tmp_path))
    assert "## Long generation" in markdown
    assert "top-1 0–8 | top-1 8–16 | top-1 16–20" in markdown
    assert "### Recall after a long answer" in markdown and "### Counting rule kept" in markdown
    assert "## Scores" not in markdown  # no answer task was run


def test_a_directory_from_before_longgen_tokens_resumes(tiny, tmp_path):
    model, tokenizer = tiny
    config = EvalConfig(recipes=["full"], tasks=["passkey"], lengths=[256], samples=1, max_new_tokens=2)
    run_eval(config, tmp_path, model, tokenizer)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["longgen_tokens"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert run_eval(config, tmp_path, model, tokenizer) == {"ran": 0, "skipped": 1}
