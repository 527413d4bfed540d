"""One decode step's attention over a layer's blocks with the compiled CPU kernels.

``fused_decode`` reads the dense and KIVI blocks where they are (nothing gathered, codes never
expanded to a dequantized copy) and merges the tiers' softmax exactly with their log-sum-exps.
It returns None when the kernels cannot serve the call (another device, no compiler, a block
format they do not read, a layer that also attends its host's tokens (``minicache``), a mask that
is not "every slot from some first one"); the caller then
runs the PyTorch path.
"""

from __future__ import annotations

import torch

from kvsqueeze.kernels import ops
from kvsqueeze.storage.layer import PagedLayer


def first_visible(
    attention_mask: torch.Tensor | None, batch: int, device: torch.device
) -> torch.Tensor | None:
    """``[B]`` the first slot each row's query may see, when the model's decode mask ``[B, 1, 1,
    T]`` (bool or additive) hides exactly the slots before it (left padding, a sliding window);
    zeros without a mask; None for any other pattern."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    row = attention_mask[:, 0, -1]
    if row.dtype != torch.bool:
        row = row > torch.finfo(row.dtype).min / 2
    first = row.int().argmax(-1)
    if not bool((row.sum(-1) == row.shape[-1] - first).all()):
        return None
    return first.long().contiguous()


def fused_decode(
    layer: PagedLayer,
    query: torch.Tensor,
    scaling: float | None,
    softcap: float | None,
    lower: torch.Tensor,
) -> torch.Tensor | None:
    """Attention of ``query [B, Hq, 1, D]`` over what ``layer`` holds, ``[B, 1, Hq, Dv]``, or
    None (see module docstring). ``lower [B]``: the first slot each row may see."""
    if (
        query.device.type != "cpu"
        or layer.reads_host
        or any(tier.quantizer.block_format != "kivi" for tier in layer.quantized)
    ):
        return None
    kernels = ops()
    if kernels is None:
        return None
    batch, q_heads, _, dim = query.shape
    dense = layer.dense
    kv_heads = dense.count.shape[1]
    folded = query.reshape(batch, kv_heads, q_heads // kv_heads, dim).float().contiguous()
    quantized, bits = [], []
    for tier in layer.quantized:
        if tier.widest:
            fields = tier.pool.fields
            names = ("key_codes", "value_codes", "key_scale", "key_min", "value_scale", "value_min", "fill")
            quantized += [fields[name] for name in names]
            quantized += [tier.table, tier.blocks, tier.count, _slots(layer, tier)]
            bits.append(tier.quantizer.bits)
    fields = dense.pool.fields
    out = kernels.decode(
        folded,
        layer.seen,
        lower,
        scaling if scaling is not None else dim**-0.5,
        softcap or 0.0,
        fields["keys"],
        fields["values"],
        dense.table,
        dense.count,
        _slots(layer, dense),
        quantized,
        bits,
    )
    return out.reshape(batch, 1, q_heads, -1).to(query.dtype)


_NO_SLOTS: dict[torch.device, torch.Tensor] = {}


def _slots(layer: PagedLayer, tier) -> torch.Tensor:
    """The tier's stored slots, or an empty tensor while slots are implied."""
    if layer.explicit_slots:
        return tier.pool.fields["slots"]
    if layer.device not in _NO_SLOTS:
        _NO_SLOTS[layer.device] = torch.zeros(0, dtype=torch.int32, device=layer.device)
    return _NO_SLOTS[layer.device]
