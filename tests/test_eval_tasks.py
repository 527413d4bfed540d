"""Task generators and metrics: deterministic, answers placed as intended, lengths on target."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer

from kvsqueeze.eval import tasks as task_lib
from kvsqueeze.eval.metrics import contains, fidelity, string_match_all, string_match_part
from kvsqueeze.eval.tasks import TASKS, TaskError, fidelity_tokens, make_sample, parse_length, resolve_tasks
from kvsqueeze.models import converted_checkpoint_dir, load_model


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded model's tokenizer alone (converts the model once if nothing did yet)."""
    if not (converted_checkpoint_dir() / "tokenizer.json").exists():
        load_model(device="cpu")
    return AutoTokenizer.from_pretrained(converted_checkpoint_dir())


@pytest.mark.parametrize("task", list(TASKS))
def test_samples_are_deterministic_per_seed(tokenizer, task):
    a = make_sample(tokenizer, task, 512, 3, seed=1)
    b = make_sample(tokenizer, task, 512, 3, seed=1)
    other_seed = make_sample(tokenizer, task, 512, 3, seed=2)
    other_index = make_sample(tokenizer, task, 512, 4, seed=1)
    assert a == b
    assert a.answers != other_seed.answers
    assert a.answers != other_index.answers


@pytest.mark.parametrize("length", [512, 1024, 2048])
@pytest.mark.parametrize("task", list(TASKS))
def test_prompt_length_within_5_percent(tokenizer, task, length):
    sample = make_sample(tokenizer, task, length, 0)
    assert abs(sample.prompt_tokens - length) <= 0.05 * length
    prefix = sample.answer_prefix if isinstance(sample.answer_prefix, str) else sample.answer_prefix[0]
    head, tail = task_lib.split_prompt(tokenizer, sample.context, sample.questions[0], prefix)
    assert (head + tail).endswith(prefix)
    measured = len(tokenizer.encode(head + tail, add_special_tokens=False))
    assert measured == sample.prompt_tokens


def _count(text: str, word: str) -> int:
    return len(re.findall(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text))


@pytest.mark.parametrize(
    "task", ["passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"]
)
@pytest.mark.parametrize("index", range(3))
def test_needle_values_appear_exactly_once(tokenizer, task, index):
    sample = make_sample(tokenizer, task, 1024, index)
    for answers in sample.answers:
        for value in answers:
            assert _count(sample.context, value) == 1, value
            for question in sample.questions:
                assert value not in question


def test_multikey_has_distractors_and_asks_one_key(tokenizer):
    sample = make_sample(tokenizer, "niah_multikey", 1024, 0)
    assert sample.context.count("One of the special magic numbers for") == 4
    assert len(sample.answers[0]) == 1


def test_single_needle_cycles_value_kinds_and_depths(tokenizer):
    samples = [make_sample(tokenizer, "niah_single", 512, i) for i in range(6)]
    kinds = [s.info["value"] for s in samples]
    assert kinds == ["numbers", "words", "uuids"] * 2
    assert [s.depth for s in samples[:5]] == list(task_lib.DEPTHS)
    uuid_value = samples[2].answers[0][0]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", uuid_value)


@pytest.mark.parametrize("depth_index", range(5))
def test_passkey_needle_sits_at_its_depth(tokenizer, depth_index):
    sample = make_sample(tokenizer, "passkey", 1024, depth_index)
    key = sample.answers[0][0]
    at = sample.context.index(f"The pass key is {key}.") / len(sample.context)
    assert abs(at - task_lib.DEPTHS[depth_index]) < 0.1


def test_multiturn_asks_different_keys_against_one_context(tokenizer):
    sample = make_sample(tokenizer, "multiturn", 1024, 0)
    assert len(sample.questions) == 4 == len(set(sample.questions))
    assert len({a[0] for a in sample.answers}) == 4
    for (value,) in sample.answers:
        assert _count(sample.context, value) == 1


def test_variable_tracking_chain_is_in_order(tokenizer):
    sample = make_sample(tokenizer, "vt", 1024, 0)
    names = sample.answers[0]
    assert len(names) == 5
    value = re.search(rf"VAR {names[0]} = (\d+)\.", sample.context).group(1)
    assert value in sample.questions[0]
    positions = [sample.context.index(f"VAR {names[0]} = {value}.")]
    positions += [sample.context.index(f"VAR {names[i + 1]} = VAR {names[i]}.") for i in range(4)]
    assert positions == sorted(positions)


def test_common_words_are_the_most_frequent(tokenizer):
    sample = make_sample(tokenizer, "cwe", 1024, 0)
    listed = re.findall(r"\d+\. (\S+)", sample.context.split("\n", 1)[1])
    counts = Counter(listed)
    common = set(sample.answers[0])
    assert len(common) == 10
    assert min(counts[w] for w in common) > max(c for w, c in counts.items() if w not in common)


def test_frequent_words_are_the_top_three_after_the_noise(tokenizer):
    sample = make_sample(tokenizer, "fwe", 1024, 0)
    counts = Counter(sample.context.split("coded words. ", 1)[1].split())
    ranked = [w for w, _ in counts.most_common() if w != "...."]
    assert set(ranked[:3]) == set(sample.answers[0])
    assert counts["...."] > counts[ranked[0]] > counts[ranked[3]]


def test_fidelity_window_is_natural_prose(tokenizer):
    context, continuation = fidelity_tokens(tokenizer, 512, 0, seed=0, continuation=64)
    assert len(context) == 512 and len(continuation) == 64
    assert (context, continuation) == fidelity_tokens(tokenizer, 512, 0, seed=0, continuation=64)
    words = tokenizer.decode(continuation).split()
    assert sum(w.strip(".,;:()\"'").isalpha() for w in words) > 0.6 * len(words)


def test_resolve_tasks_and_lengths():
    assert resolve_tasks("ruler-lite") == list(TASKS)
    assert resolve_tasks("passkey,fidelity,passkey") == ["passkey", "fidelity"]
    assert parse_length("1k") == 1024 and parse_length("512") == 512 and parse_length("1.5k") == 1536
    for bad in ("1q", "k", "-1k", "10", "0.3"):
        with pytest.raises(TaskError):
            parse_length(bad)
    with pytest.raises(TaskError, match="unknown task 'nope'"):
        resolve_tasks("passkey,nope")


def test_string_match_is_whole_word_and_case_insensitive():
    assert contains("The pass key is 63055.", "63055")
    assert not contains("The pass key is 63055.", "6305")
    assert contains("words: Tender-Grape, cat", "tender-grape")
    assert not contains("space", "pace")
    assert string_match_all("1. apple 2. pear", ["apple", "pear", "plum", "fig"]) == 0.5
    assert string_match_all("nothing", []) == 0.0
    assert string_match_part("1. apple", ["plum", "apple"]) == 1.0
    assert string_match_part("1. apple", ["plum"]) == 0.0


def test_fidelity_metrics_on_hand_made_logits():
    full = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    same = fidelity(full, full.clone(), [0, 1])
    assert same["kl"] == pytest.approx(0.0, abs=1e-12) and same["top1"] == 1.0
    assert same["ppl"] == same["ppl_full"] == pytest.approx(1 / torch.softmax(full[0], -1)[0].item())
    swapped = fidelity(full, full.flip(0), [0, 1])
    assert swapped["top1"] == 0.0 and swapped["kl"] > 1.0 and swapped["ppl"] > swapped["ppl_full"]
