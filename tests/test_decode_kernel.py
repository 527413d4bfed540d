"""The compiled CPU decode kernel against the PyTorch attention path, on every storage layout."""

from __future__ import annotations

import shutil

import pytest
import torch
from test_cache import run
from tiny_models import padded_batch, tiny_model

from kvsqueeze import attention
from kvsqueeze.attention import install
from kvsqueeze.cache import CompressedCache
from kvsqueeze.kernels import ops
from kvsqueeze.kernels.decode import first_visible
from kvsqueeze.recipe import Recipe

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler to build the kernels")

QUANTIZED = "group_size=8,residual=4"


def test_the_kernels_build_on_this_machine():
    assert ops() is not None and hasattr(ops(), "decode")


def decode_logits(model, recipe: str, ids, mask, monkeypatch, fused: bool) -> torch.Tensor:
    calls = []

    def counting(*args):
        out = original(*args) if fused else None
        calls.append(out is not None)
        return out

    original = attention.fused_decode
    with monkeypatch.context() as patch:
        patch.setattr(attention, "fused_decode", counting)
        with torch.no_grad():
            logits = run(model, CompressedCache(Recipe.parse(recipe), block_size=4), ids, mask, new_tokens=4)
    assert calls and all(calls) == fused  # the kernel served every decode step, or none
    return logits


@pytest.mark.parametrize(
    ("arch", "recipe"),
    [
        ("llama", "full"),  # implied slots, left padding (a first visible slot per row)
        ("qwen2", "knorm@0.5"),  # stored slots, ragged after eviction
        ("llama", "snapkv:window=4+adakv@0.5"),  # heads of different lengths
        ("mistral", "full"),  # a sliding window: the slots before it are hidden
        ("gemma2", "full"),  # logit soft-capping
        ("gemma3", "knorm@0.5"),  # sliding and full layers, evicted full layers
        ("llama", f"kivi4:{QUANTIZED}"),  # 4-bit blocks + a 16-bit tail
        ("qwen2", f"knorm+kivi2:{QUANTIZED}@0.5"),  # 2-bit blocks with holes after eviction
        ("llama", f"snapkv:window=4+mixed:{QUANTIZED}@0.75"),  # two quantized tiers
    ],
)
def test_fused_decode_equals_the_pytorch_path(arch, recipe, monkeypatch):
    model = install(tiny_model(arch))
    ids, mask = padded_batch([40, 27], seed=8)
    fused = decode_logits(model, recipe, ids, mask, monkeypatch, fused=True)
    reference = decode_logits(model, recipe, ids, mask, monkeypatch, fused=False)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=0)
    assert (fused[:, 1:] - fused[:, :1]).abs().max() > 1e-3  # decode steps differ: not a constant


def test_first_visible_slot_of_a_decode_mask():
    left_padded = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)[:, None, None]
    assert first_visible(left_padded, 2, torch.device("cpu")).tolist() == [2, 0]
    assert first_visible(None, 3, torch.device("cpu")).tolist() == [0, 0, 0]
    holes = torch.tensor([[1, 0, 1, 1]], dtype=torch.bool)[:, None, None]
    assert first_visible(holes, 1, torch.device("cpu")) is None  # not expressible: PyTorch path
