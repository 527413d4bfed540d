"""The eval runner end to end on a tiny random model with the real tokenizer: same samples for
every recipe, resume, determinism, Ctrl-C, the report, the CLI; plus the engine additions."""

from __future__ import annotations

import json

import pytest

from kvsqueeze import generate
from kvsqueeze.cli import main
from kvsqueeze.engine import continuation_logits, generate_multiturn
from kvsqueeze.eval import runner as runner_module
from kvsqueeze.eval.intervals import bootstrap_mean, paired_ratio, wilson
from kvsqueeze.eval.metrics import fidelity
from kvsqueeze.eval.report import prefill_label, summarize, summary_markdown
from kvsqueeze.eval.runner import EvalConfig, EvalError, load_records, run_eval

CONTEXT = "The museum opens at nine. " * 30 + "The secret word is pelican. " + "Tea is served at four. " * 30


def _config(**overrides) -> EvalConfig:
    options = dict(
        recipes=["snapkv@0.5"],
        tasks=["passkey", "multiturn", "fidelity"],
        lengths=[256],
        samples=2,
        fidelity_tokens=16,
        max_new_tokens=3,
    )
    options.update(overrides)
    return EvalConfig(**options)


STABLE = ("key", "prediction", "answers", "score", "kv_bytes", "kv_bytes_full", "prompt_tokens", "kl", "top1")


def _stable(records):
    return [{k: r.get(k) for k in STABLE} for r in records]


@pytest.mark.parametrize("query_aware", [False, True])
@pytest.mark.parametrize("recipe", ["full", "snapkv@0.5"])
def test_one_question_multiturn_equals_generate(tiny, recipe, query_aware):
    model, tokenizer = tiny
    question = "What is the secret word?"
    single = generate(model, tokenizer, CONTEXT, question, recipe, query_aware=query_aware, max_new_tokens=6)
    (turn,) = generate_multiturn(
        model, tokenizer, CONTEXT, [question], recipe, query_aware=query_aware, max_new_tokens=6
    )
    assert turn.answer == single.answer
    assert turn.kv_bytes == single.kv_bytes and turn.mode == single.mode


def test_later_turns_answer_against_an_untouched_copy(tiny):
    model, tokenizer = tiny
    questions = ["What is the secret word?", "When is tea served?", "When does the museum open?"]
    turns = generate_multiturn(model, tokenizer, CONTEXT, questions, "snapkv@0.5", max_new_tokens=6)
    for question, turn in zip(questions, turns, strict=True):
        alone = generate(model, tokenizer, CONTEXT, question, "snapkv@0.5", max_new_tokens=6)
        assert turn.answer == alone.answer
    aware = generate_multiturn(
        model, tokenizer, CONTEXT, questions, "snapkv@0.5", query_aware=True, max_new_tokens=6
    )
    assert [t.mode for t in aware] == ["query-aware"] * 3
    # later turns hold the context compressed for the first question, its tokens cropped
    assert aware[1].tokens_kept < aware[0].tokens_kept


def test_continuation_logits_full_is_exact_and_compression_diverges(tiny, tokenizer):
    model, _ = tiny
    context = list(range(1000, 1200))
    continuation = list(range(1200, 1220))
    full = continuation_logits(model, context, continuation, "full")
    again = continuation_logits(model, context, continuation, "full")
    squeezed = continuation_logits(model, context, continuation, "streaming@0.75")
    assert full.logits.shape == (20, len(tokenizer))
    assert fidelity(full.logits, again.logits, continuation)["kl"] == pytest.approx(0.0, abs=1e-9)
    assert fidelity(full.logits, squeezed.logits, continuation)["kl"] > 0
    assert squeezed.footprint["kv_bytes"] < 0.5 * full.footprint["kv_bytes"]


def test_eval_runs_every_recipe_on_the_same_samples_and_resumes(tiny, tmp_path):
    model, tokenizer = tiny
    first = run_eval(_config(), tmp_path, model, tokenizer)
    assert first == {"ran": 12, "skipped": 0}
    records = load_records(tmp_path)
    assert len(records) == 12
    by_recipe = {}
    for r in records:
        by_recipe.setdefault(r["recipe"], set()).add((r["task"], r["length"], r["sample"]))
    assert by_recipe["full"] == by_recipe["snapkv@0.5"] and len(by_recipe["full"]) == 6
    passkey = next(r for r in records if r["task"] == "passkey")
    for field in ("prediction", "answers", "score", "kv_bytes", "kv_bytes_full", "prefill_seconds", "mode"):
        assert field in passkey
    assert passkey["kv_bytes_peak"] >= passkey["kv_bytes_end"] >= passkey["kv_bytes"]
    assert all(r["chunk_size"] is None for r in records)
    multiturn = next(r for r in records if r["task"] == "multiturn")
    assert len(multiturn["turn_scores"]) == 4 == len(multiturn["prediction"])
    fid = next(r for r in records if r["task"] == "fidelity" and r["recipe"] == "snapkv@0.5")
    assert {"kl", "top1", "ppl", "ppl_full"} <= set(fid)

    # a torn last line (a crash mid-write) is ignored, and nothing finished is run again
    with (tmp_path / "results.jsonl").open("a") as handle:
        handle.write('{"recipe": "full", "trunc')
    assert run_eval(_config(), tmp_path, model, tokenizer) == {"ran": 0, "skipped": 12}
    more = run_eval(_config(samples=3, recipes=["snapkv@0.5", "streaming@0.5"]), tmp_path, model, tokenizer)
    assert more == {"ran": 3 * 3 + 6, "skipped": 12}
    assert len(load_records(tmp_path)) == 27

    with pytest.raises(EvalError, match="seed=0 there, 5 now"):
        run_eval(_config(seed=5), tmp_path, model, tokenizer)


def test_eval_is_deterministic(tiny, tmp_path):
    model, tokenizer = tiny
    config = _config(tasks=["niah_single", "fidelity"], samples=1)
    run_eval(config, tmp_path / "a", model, tokenizer)
    run_eval(config, tmp_path / "b", model, tokenizer)
    assert _stable(load_records(tmp_path / "a")) == _stable(load_records(tmp_path / "b"))


def _record(recipe, task, sample, score, ratio, depth=None, **extra):
    return {
        "key": f"{recipe}|query-agnostic|{task}|1024|{sample}",
        "recipe": recipe,
        "mode": "query-agnostic",
        "task": task,
        "length": 1024,
        "sample": sample,
        "seed": 0,
        "model": "m",
        "score": score,
        "compression_ratio": ratio,
        "kv_bytes_16bit": round((1 - ratio) * 1000),
        "kv_bytes_full_16bit": 1000,
        "kv_dtype": "float32",
        "depth": depth,
        **extra,
    }


def test_report_renders_from_saved_lines(tmp_path):
    records = [
        _record("full", "passkey", 0, 1.0, 0.0, depth=0.0),
        _record("full", "passkey", 1, 1.0, 0.0, depth=0.5),
        _record("full", "vt", 0, 0.8, 0.0),
        _record("snapkv@0.5", "passkey", 0, 1.0, 0.49, depth=0.0),
        _record("snapkv@0.5", "passkey", 1, 0.0, 0.49, depth=0.5),
        _record("snapkv@0.5", "vt", 0, 0.4, 0.49),
        _record("snapkv@0.75", "passkey", 0, 0.0, 0.74, depth=0.0),
        # a sample the full cache did not answer is left out of every comparison
        _record("snapkv@0.75", "passkey", 7, 1.0, 0.74, depth=0.0),
        _record("full", "multiturn", 0, 0.5, 0.0, turn_scores=[1.0, 1.0, 0.0, 0.0]),
        _record("snapkv@0.5", "multiturn", 0, 0.25, 0.49, turn_scores=[1.0, 0.0, 0.0, 0.0]),
        _record(
            "full", "fidelity", 0, 1.0, 0.0, kl=0.0, top1=1.0, ppl=10.0, ppl_full=10.0, continuation_tokens=8
        ),
        _record(
            "snapkv@0.5",
            "fidelity",
            0,
            0.5,
            0.5,
            kl=0.7,
            top1=0.5,
            ppl=14.0,
            ppl_full=10.0,
            continuation_tokens=8,
        ),
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = summarize(records)["query-agnostic"]["rows"]
    assert rows["full"]["tasks"] == {"passkey": 1.0, "vt": 0.8, "multiturn": 0.5}
    assert rows["snapkv@0.5"]["tasks"] == {"passkey": 0.5, "vt": 0.4, "multiturn": 0.25}
    assert rows["snapkv@0.5"]["relative"] == pytest.approx(0.5)
    assert rows["snapkv@0.75"]["tasks"] == {"passkey": 0.0} and not rows["snapkv@0.75"]["complete"]

    # intervals: the mean over tasks resampled within each task, vs full paired on the same samples
    snapkv_strata, full_strata = [[1.0, 0.0], [0.4], [0.25]], [[1.0, 1.0], [0.8], [0.5]]
    assert rows["snapkv@0.5"]["interval"] == bootstrap_mean(snapkv_strata)
    assert rows["snapkv@0.5"]["relative_interval"] == paired_ratio(snapkv_strata, full_strata)
    assert rows["snapkv@0.5"]["task_intervals"]["passkey"] == wilson(1, 2)
    assert rows["full"]["relative_interval"].low == rows["full"]["relative_interval"].high == 1.0

    assert main(["eval", "report", str(tmp_path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    mean_low, mean_high = (
        100 * v for v in (rows["snapkv@0.5"]["interval"].low, rows["snapkv@0.5"]["interval"].high)
    )
    relative = rows["snapkv@0.5"]["relative_interval"]
    assert (
        f"| `snapkv@0.5` | 38.3 [{mean_low:.1f}, {mean_high:.1f}] "
        f"| 0.50 [{relative.low:.2f}, {relative.high:.2f}] | 49.0% | 2.0x | float32 | 4 |"
    ) in summary
    passkey = wilson(1, 2)
    assert (
        f"| `snapkv@0.5` | 50.0 [{100 * passkey.low:.1f}, {100 * passkey.high:.1f}] (n=2) "
        "| 40.0 [40.0, 40.0] (n=1) |" in summary
    )
    assert "| `snapkv@0.75` | 0.0 [0.0, 79.3] (n=1) | – | – |" in summary  # Wilson for 0 of 1
    # multi-turn: turn 1 vs later turns (one value per prompt)
    assert "| `snapkv@0.5` | 100.0 [20.7, 100.0] | 0.0 [0.0, 79.3] | 1 |" in summary
    assert (
        "| `snapkv@0.5` | 0.700 [0.700, 0.700] | 50.0 [50.0, 50.0] | 14.00 [14.00, 14.00] | 50.0% | 1 |"
        in summary
    )
    assert "prefill: not recorded" in summary and "Target" not in summary
    for name in ("score_vs_ratio.png", "needle_heatmap.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in summary


def test_ctrl_c_keeps_finished_samples_and_exits_130(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("kvsqueeze.cli.load_model", lambda *args, **kwargs: tiny)
    calls = {"n": 0}
    real = runner_module.generate_multiturn

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_module, "generate_multiturn", interrupted)
    args = ["eval", "--tasks", "passkey", "--lengths", "256", "--samples", "2", "--out", str(tmp_path)]
    args += ["--recipes", "full,streaming@0.5", "--no-plots", "--max-new-tokens", "3"]
    assert main(args) == 130
    assert len(load_records(tmp_path)) == 2
    assert "run the same command again to resume" in capsys.readouterr().err
    monkeypatch.setattr(runner_module, "generate_multiturn", real)
    assert main(args) == 0
    assert len(load_records(tmp_path)) == 4
    assert "ran 2, skipped 2" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["eval"], ["eval", "report"]])
def test_eval_commands_have_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: kvsqueeze eval" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lengths", "1q"], "bad length '1q'"),
        (["--tasks", "passkey,nope"], "unknown task 'nope'"),
        (["--recipes", "full,snapkvv@0.5"], "did you mean 'snapkv'"),
        (["--recipes", "snapkv@1.5"], "ratio must be in [0, 1)"),
        (["--samples", "0"], "--samples must be at least 1"),
        (["--chunk-size", "-1"], "--chunk-size must be a number of tokens"),
    ],
)
def test_eval_bad_input_is_one_error_line(args, message, tmp_path, capsys):
    assert main(["eval", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_eval_needs_an_out_dir_and_report_needs_results(tmp_path, capsys):
    assert main(["eval"]) == 2
    assert "--out DIR is required" in capsys.readouterr().err
    assert main(["eval", "report", str(tmp_path)]) == 2
    assert "has no results.jsonl" in capsys.readouterr().err


@pytest.mark.real_model
def test_real_model_eval_passkey_full_answers(real_model, tmp_path):
    model, tokenizer = real_model
    config = EvalConfig(
        recipes=["snapkv@0.75"], tasks=["passkey"], lengths=[512], samples=1, query_aware=True
    )
    assert run_eval(config, tmp_path, model, tokenizer) == {"ran": 2, "skipped": 0}
    full, snapkv = load_records(tmp_path)
    assert full["recipe"] == "full" and full["score"] == 1.0, full["prediction"]
    assert snapkv["mode"] == "query-aware" and 0.70 < snapkv["compression_ratio"] < 0.75
    assert abs(full["prompt_tokens"] - 512) <= 0.05 * 512


def _saved_lines(tmp_path, full, recipe):
    records = [_record("full", "vt", i, score, 0.0) for i, score in enumerate(full)]
    records += [_record("snapkv@0.5", "vt", i, score, 0.49) for i, score in enumerate(recipe)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_report_says_which_recipe_meets_a_target_by_its_interval(tmp_path, capsys):
    full = [0.8, 0.6, 1.0, 0.4, 0.8, 0.6, 1.0, 0.4, 0.8, 0.6]
    _saved_lines(tmp_path, full, [score * 0.96 for score in full])  # every sample at 0.96 of full
    assert main(["eval", "report", str(tmp_path), "--no-plots", "--target-vs-full", "0.95"]) == 0
    out = capsys.readouterr().out
    assert "### Target: vs full ≥ 0.95 (query-agnostic)" in out
    assert "| `snapkv@0.5` | 0.96 [0.96, 0.96] | 10 | yes |" in out
    assert "| `full` |" not in out.split("### Target")[1].split("\n\n")[2]

    _saved_lines(tmp_path, full, [0.0, *full[1:]])  # 0.89 of full, one answer lost
    assert main(["eval", "report", str(tmp_path), "--no-plots", "--target-vs-full", "0.8"]) == 0
    lines = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("| `snapkv@0.5` | 0.89 [")
    ]
    assert lines[-1].endswith("| 10 | no |")  # the point clears 0.8, the interval's lower end does not
    assert "0.89 [" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize("target", ["0", "1.5", "-0.2", "nan"])
def test_report_target_out_of_range_is_one_error_line(target, tmp_path, capsys):
    _saved_lines(tmp_path, [1.0, 0.5], [1.0, 0.5])
    assert main(["eval", "report", str(tmp_path), "--target-vs-full", target]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --target-vs-full must be in (0, 1]") and err.count("\n") == 1
    assert not (tmp_path / "summary.md").exists()


def test_old_lines_take_the_chunk_size_of_their_config(tmp_path):
    _saved_lines(tmp_path, [1.0], [1.0])
    assert prefill_label(load_records(tmp_path)) == "not recorded"
    (tmp_path / "config.json").write_text(json.dumps({"chunk_size": None}))
    assert prefill_label(load_records(tmp_path)) == "the whole context in one forward"
    mixed = [{"chunk_size": 256}, {"chunk_size": None}, {}]
    assert prefill_label(mixed) == "chunks of 256 tokens; the whole context in one forward; not recorded"


def _longest_forward(model):
    seen = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    return seen, handle


@pytest.mark.parametrize(
    ("option", "chunk", "label"),
    [([], 256, "chunks of 256 tokens"), (["0"], None, "the whole context in one forward")],
)
def test_eval_prefills_in_the_servers_chunks_unless_told(
    option, chunk, label, tiny, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr("kvsqueeze.cli.load_model", lambda *args, **kwargs: tiny)
    seen, handle = _longest_forward(tiny[0])
    args = ["eval", "--tasks", "passkey", "--lengths", "640", "--samples", "1", "--recipes", "snapkv@0.5"]
    args += ["--out", str(tmp_path), "--no-plots", "--max-new-tokens", "2"]
    try:
        assert main(args + (["--chunk-size", *option] if option else [])) == 0
    finally:
        handle.remove()
    records = load_records(tmp_path)
    assert [r["chunk_size"] for r in records] == [chunk, chunk]
    assert (max(seen) <= 256) == (chunk == 256) and max(seen) > 0
    assert f"prefill: {label}." in capsys.readouterr().out


def test_summary_names_the_layers_a_recipe_left_as_transformers_holds_them():
    def line(recipe, compressed):
        return _record(recipe, "passkey", 0, 1.0, 0.3, layers=18, compressed_layers=compressed)

    hybrid = [line("full", 0), line("snapkv@0.75", 3), line("snapkv+sliding@0.75", 18)]
    summary = summary_markdown(hybrid)
    assert "Layers compressed: `snapkv@0.75` 3/18, `snapkv+sliding@0.75` 18/18." in summary
    every = [line("full", 0), line("snapkv+sliding@0.75", 18)]
    assert "Layers compressed" not in summary_markdown(every)
    assert "Layers compressed" not in summary_markdown([_record("snapkv@0.5", "passkey", 0, 1.0, 0.5)])
