"""Calibration finds planted retrieval heads, deterministically; the CLI glue writes a profile."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from tiny_models import tiny_model

from kvsqueeze.budgets.head_profile import HeadProfile, find_profile, profile_key
from kvsqueeze.calibrate import add_calibrate_command, calibrate, copy_samples, passkey_samples

PLANTED = {(0, 1), (2, 0)}  # (layer, KV head) made to attend to earlier copies of the current token


def planted_model(seed: int = 0) -> torch.nn.Module:
    """A tiny random Llama whose ``PLANTED`` KV heads are echo heads, set by hand.

    Embeddings are large random vectors, so every layer's normalised input is (almost) the
    token's own embedding. In a planted head, queries and keys project that input onto the same
    12 dimensions, so ``q_i . k_j`` is large exactly when tokens ``i`` and ``j`` are equal: the
    head looks back at earlier copies of the current token (RazorAttention's echo head). RoPE is
    made negligible (huge theta, and the two fastest-rotating dimensions left empty).
    """
    model = tiny_model(
        "llama",
        seed,
        layers=3,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 1e12},
    )
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    head_dim, n_rep = config.head_dim, 2
    used = [d for d in range(head_dim) if d % (head_dim // 2) >= 2]  # skip the fast RoPE pairs
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.randn(96, 64, generator=generator))
        for layer, kv_head in PLANTED:
            attn = model.model.layers[layer].self_attn
            basis = torch.linalg.qr(torch.randn(64, 64, generator=generator))[0][: len(used)]
            k_rows = attn.k_proj.weight[kv_head * head_dim : (kv_head + 1) * head_dim]
            k_rows.zero_()
            k_rows[used] = basis
            for q_head in range(kv_head * n_rep, (kv_head + 1) * n_rep):
                q_rows = attn.q_proj.weight[q_head * head_dim : (q_head + 1) * head_dim]
                q_rows.zero_()
                q_rows[used] = 4.0 * basis
    return model


def test_calibration_finds_planted_retrieval_heads():
    model = planted_model()
    profile = calibrate(model, samples=4, seed=0)
    ranked = profile.ranked()
    assert {(layer, head) for layer, head, _ in ranked[:2]} == PLANTED
    planted_scores = [score for layer, head, score in ranked if (layer, head) in PLANTED]
    others = [score for layer, head, score in ranked if (layer, head) not in PLANTED]
    assert min(planted_scores) > 0.2 > 0.1 > max(others)
    assert profile.retrieval_heads(2 / 6).nonzero().tolist() == sorted([list(p) for p in PLANTED])
    assert profile.probe["kind"] == "copy" and profile.probe["seed"] == 0


def test_calibration_is_deterministic_and_seeded():
    model = planted_model()
    first = calibrate(model, samples=2, seed=3)
    again = calibrate(model, samples=2, seed=3)
    other = calibrate(model, samples=2, seed=4)
    assert first.scores == again.scores
    assert first.scores != other.scores
    assert copy_samples(96, 2, seed=3) == copy_samples(96, 2, seed=3)


def test_probe_samples_point_at_the_key():
    sample = copy_samples(96, 1, seed=0, length=64, key_length=5)[0]
    ids = sample.input_ids
    needle = [ids[p] for p in sample.needle]
    answers = [ids[row + 1] for row in sample.answer_rows]
    assert needle == answers and len(needle) == 5 and len(set(needle)) == 5
    assert sample.answer_rows[-1] == len(ids) - 2
    assert max(sample.needle) < min(sample.answer_rows)


class DigitTokenizer:
    """Just enough tokenizer for ``passkey_samples``: one id per character, no chat template."""

    chat_template = None
    bos_token_id = None

    def encode(self, text, add_special_tokens=False):
        return [ord(ch) % 96 for ch in text]


def test_passkey_samples_put_the_key_in_context_and_answer():
    tokenizer = DigitTokenizer()
    samples = passkey_samples(tokenizer, 3, seed=1, context_tokens=200)
    assert samples == passkey_samples(tokenizer, 3, seed=1, context_tokens=200)
    for sample in samples:
        ids = sample.input_ids
        key = [ids[row + 1] for row in sample.answer_rows]
        assert len(key) == 6 and [ids[p] for p in sample.needle] == key * 2
        assert len(ids) > 200


def test_profile_round_trip_and_lookup(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSQUEEZE_HOME", str(tmp_path))
    profile = HeadProfile("org--tiny", [[0.5, 0.25], [0.75, 0.0]], {"seed": 1})
    profile.save(tmp_path / "profiles" / "org--tiny.json")
    assert profile_key("org/tiny") == "org--tiny"
    assert profile_key(str(tmp_path / "checkpoints" / "tiny")) == "tiny"
    loaded = find_profile("org/tiny")
    assert loaded == profile
    assert loaded.retrieval_heads(0.5).tolist() == [[True, False], [True, False]]
    assert json.loads((tmp_path / "profiles" / "org--tiny.json").read_text())["probe"] == {"seed": 1}


def test_calibrate_command_parses_its_options():
    parser = argparse.ArgumentParser(prog="kvsqueeze")
    add_calibrate_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["calibrate", "--model", "m", "--samples", "3", "--seed", "7", "--out", "p.json"]
    )
    assert (args.model, args.samples, args.seed, str(args.out)) == ("m", 3, 7, "p.json")
    with pytest.raises(SystemExit):
        parser.parse_args(["calibrate", "--samples", "0"])


def test_the_embedded_model_ships_a_profile_and_a_user_profile_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSQUEEZE_HOME", str(tmp_path))
    # load_model() names the embedded model by its converted checkpoint directory
    shipped = find_profile(str(tmp_path / "models" / "smollm2-135m"))
    assert shipped.model == "smollm2-135m" and shipped.shape == (30, 3)
    assert shipped.probe["kind"] == "passkey" and shipped.probe["samples"] >= 8
    assert int(shipped.retrieval_heads(0.25).sum()) == 23
    mine = HeadProfile("smollm2-135m", [[1.0, 0.0, 0.0]] * 30)
    mine.save(tmp_path / "profiles" / "smollm2-135m.json")
    assert find_profile("smollm2-135m") == mine
