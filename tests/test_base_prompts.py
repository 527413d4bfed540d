"""Prompts for models without a chat template (base models): RULER-style completions with the
task's answer prefix, one BOS token as the tokenizer adds it, and a server that refuses chat."""

from __future__ import annotations

import copy

import pytest
from test_serve_helpers import http, serving

from kvsqueeze import cli
from kvsqueeze.engine import generate, split_prompt
from kvsqueeze.eval.tasks import TASKS, make_sample

CONTEXT = "The pass key is 31415. Remember it. The grass is green. The sky is blue."
QUESTION = "What is the pass key?"


@pytest.fixture(scope="module")
def base(tiny):
    """The tiny model with the real tokenizer turned into a base model's: no chat template, and it
    puts its BOS token before what it encodes."""
    model, tokenizer = tiny
    base_tokenizer = copy.deepcopy(tokenizer)
    base_tokenizer.chat_template = None
    base_tokenizer.add_bos_token = True
    assert base_tokenizer.encode("a")[0] == base_tokenizer.bos_token_id
    return model, base_tokenizer


def test_base_prompt_is_a_completion_with_one_bos_and_the_answer_prefix(base):
    _, tokenizer = base
    head, tail = split_prompt(tokenizer, CONTEXT, QUESTION, "The pass key is")
    assert head == f"{tokenizer.bos_token}{CONTEXT}"
    assert tail == f"\n\n{QUESTION}\nAnswer: The pass key is"
    ids = tokenizer.encode(head + tail, add_special_tokens=False)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_a_chat_model_gets_its_template_and_nothing_more(tiny):
    _, tokenizer = tiny
    head, tail = split_prompt(tokenizer, CONTEXT, QUESTION, "The pass key is")
    messages = [{"role": "user", "content": f"{CONTEXT}\n\n{QUESTION}"}]
    framed = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert head + tail == framed + "The pass key is"


@pytest.mark.parametrize("task", [name for name in TASKS if name != "fidelity"])
def test_every_task_has_an_answer_prefix_that_ends_a_base_prompt(base, task):
    _, tokenizer = base
    sample = make_sample(tokenizer, task, 512, 0)
    prefixes = [sample.answer_prefix] if isinstance(sample.answer_prefix, str) else sample.answer_prefix
    for question, prefix in zip(sample.questions, prefixes, strict=True):
        assert prefix.strip()
        head, tail = split_prompt(tokenizer, sample.context, question, prefix)
        assert tail.endswith(prefix) and "Answer: Answer:" not in tail
        assert tokenizer.encode(head + tail, add_special_tokens=False).count(tokenizer.bos_token_id) == 1


def test_answer_prefix_is_fed_but_not_part_of_the_answer(base):
    model, tokenizer = base
    without = generate(model, tokenizer, CONTEXT, QUESTION, max_new_tokens=3)
    with_prefix = generate(
        model, tokenizer, CONTEXT, QUESTION, max_new_tokens=3, answer_prefix="The pass key is"
    )
    prefix_tokens = len(tokenizer.encode(" The pass key is", add_special_tokens=False))
    assert with_prefix.question_tokens == without.question_tokens + prefix_tokens
    assert with_prefix.context_tokens == without.context_tokens
    assert not with_prefix.answer.startswith("The pass key is")


def test_run_passes_answer_prefix(monkeypatch, capsys, base):
    seen = {}

    def fake_generate(model, tokenizer, context, question, recipe, **options):
        seen.update(options, context=context, question=question)
        return generate(model, tokenizer, context, question, recipe, **{**options, "max_new_tokens": 1})

    monkeypatch.setattr(cli, "load_model", lambda *args, **kwargs: base)
    monkeypatch.setattr(cli, "generate", fake_generate)
    argv = ["run", "--context", CONTEXT, "--question", QUESTION, "--answer-prefix", "The pass key is"]
    assert cli.main([*argv, "--json"]) == 0
    assert seen["answer_prefix"] == "The pass key is" and seen["question"] == QUESTION
    assert '"answer"' in capsys.readouterr().out


def test_server_refuses_chat_for_a_base_model_and_completes(base):
    model, tokenizer = base
    with serving(model, tokenizer, model_name="tiny-base") as (url, _):
        chat = {"model": "tiny-base", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2}
        status, body = http("POST", f"{url}/v1/chat/completions", body=chat)
        assert status == 400
        message = body["error"]["message"]
        assert "no chat template" in message and "/v1/completions" in message
        status, body = http("POST", f"{url}/v1/contexts", body={"document": CONTEXT})
        assert status == 400 and "no chat template" in body["error"]["message"]
        completion = {"model": "tiny-base", "prompt": f"{CONTEXT}\n\n{QUESTION}\nAnswer:", "max_tokens": 2}
        status, body = http("POST", f"{url}/v1/completions", body=completion)
        assert status == 200 and body["usage"]["completion_tokens"] >= 1
        prompt_ids = tokenizer.encode(completion["prompt"])  # the tokenizer's own BOS, once
        assert body["usage"]["prompt_tokens"] == len(prompt_ids)
