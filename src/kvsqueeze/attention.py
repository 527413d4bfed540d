"""The attention hook: attention over ragged compressed storage, and compression after it.

Registered once as the attention implementation ``"kvsqueeze"`` (plus a mask function of the same
name, so transformers materialises the padding/causal/sliding mask instead of dropping it). The
model calls ``cache.update`` and hands us what it returned; a ``LayerView`` attached to the key
tensor leads back to the cache layer. With any other cache the hook is plain SDPA.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvsqueeze.cache import CompressedLayer, LayerView
from kvsqueeze.scorers.base import ScoringInputs

ATTENTION_NAME = "kvsqueeze"


def head_mask(
    attention_mask: torch.Tensor | None, slots: torch.Tensor, query_slots: torch.Tensor
) -> torch.Tensor:
    """Per-KV-head boolean mask ``[B, Hkv, q, L]`` for candidates at ``slots [B, Hkv, L]``.

    ``attention_mask`` is the model's 4D mask ``[B, 1, q, T]`` over slots (bool, or additive
    float); its columns are gathered at each head's stored slots. Without one, the mask is causal
    by slot (``query_slots [q]``). Padding entries (slot ``-1``) are masked.
    """
    batch, heads, length = slots.shape
    stored = slots >= 0
    if attention_mask is None:
        allowed = slots[:, :, None, :] <= query_slots[None, None, :, None]
        return allowed & stored[:, :, None, :]
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    q_len = attention_mask.shape[2]
    index = slots.clamp(min=0)[:, :, None, :].expand(batch, heads, q_len, length)
    gathered = attention_mask.expand(batch, heads, q_len, -1).gather(-1, index)
    return gathered & stored[:, :, None, :]


def grouped_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """SDPA with a different mask per KV head: ``query [B, Hq, q, D]``, ``mask [B, Hkv, q, L]``.

    The ``n_rep`` query heads sharing a KV head are folded into the query axis, so keys and values
    are never repeated. Returns ``[B, q, Hq, D]``. Fully masked rows (padding queries) give finite
    garbage, as in transformers, instead of NaN.
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    n_rep = q_heads // kv_heads
    folded = query.reshape(batch, kv_heads, n_rep * q_len, dim)
    bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
    bias.masked_fill_(~mask, torch.finfo(query.dtype).min)
    bias = (
        bias[:, :, None].expand(batch, kv_heads, n_rep, q_len, -1).reshape(batch, kv_heads, n_rep * q_len, -1)
    )
    out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=bias, scale=scaling)
    return out.reshape(batch, q_heads, q_len, -1).transpose(1, 2).contiguous()


def kvsqueeze_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function registered as ``"kvsqueeze"`` (signature of transformers' interface)."""
    view: LayerView | None = getattr(key, "kvsqueeze_view", None)
    if view is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    layer = view.layer
    q_len = query.shape[2]
    query_slots = torch.arange(layer.seen - q_len, layer.seen, device=query.device)
    if view.is_prefix:
        output, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, **kwargs
        )
    else:
        mask = head_mask(attention_mask, view.slots, query_slots)
        output = grouped_attention(query, view.keys, view.values, mask, scaling)
    if layer.cache.compresses(q_len):
        compress_layer(module, layer, view, query, attention_mask, query_slots, scaling, kwargs)
    if layer.cache.quantize_now:
        layer.settle()
    return output, None


def compress_layer(
    module: torch.nn.Module,
    layer: CompressedLayer,
    view: LayerView,
    query: torch.Tensor,
    attention_mask: torch.Tensor | None,
    query_slots: torch.Tensor,
    scaling: float | None,
    kwargs: dict,
) -> None:
    """Score this layer's candidates with the cache's recipe and keep the selected tokens."""
    batch, _, q_len, dim = query.shape
    # a candidate the last query cannot see (left padding, outside a sliding window) is dead weight
    visible = head_mask(
        attention_mask[:, :, -1:] if attention_mask is not None else None, view.slots, query_slots[-1:]
    )
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = query_slots[None]
    config = module.config
    inputs = ScoringInputs(
        keys=view.keys,
        values=view.values,
        slots=view.slots,
        valid=visible[:, :, 0],
        queries=query,
        query_positions=position_ids.expand(batch, q_len),
        query_slots=query_slots.expand(batch, q_len),
        scaling=scaling if scaling is not None else dim**-0.5,
        layer_idx=module.layer_idx,
        num_layers=config.num_hidden_layers,
        rope_inv_freq=layer.cache.rope_inv_freq(config, query.device),
        previous_scores=view.scores,
        config=config,
        units=layer.cache.units_of(view.slots),
    )
    valid = inputs.valid
    protect_from = layer.cache.protect_from
    protected = valid & (view.slots >= protect_from) if protect_from is not None else torch.zeros_like(valid)
    new_context = valid & ~protected & (view.slots >= layer.seen - q_len)
    layer.context_seen += new_context[:, 0].sum(-1)
    recipe, budget_state = layer.cache.recipe, layer.cache.budget_state
    keep, state = recipe.select(inputs, layer.context_seen, protected, budget_state)
    demotes = recipe.quantizer is not None and recipe.quantizer.demotes
    layer.keep(view, keep, state, demote=valid if demotes else None)
    if recipe.budget is not None:  # CAKE re-trims the layers before this one
        recipe.budget.rebalance(layer.cache.layers, module.layer_idx, budget_state)


def _kvsqueeze_mask(*args, **kwargs):
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register the attention and mask functions under ``"kvsqueeze"`` (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, kvsqueeze_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _kvsqueeze_mask)


def install(model: PreTrainedModel) -> PreTrainedModel:
    """Make ``model`` run its attention through kvsqueeze (harmless with other caches)."""
    register()
    model.set_attn_implementation(ATTENTION_NAME)
    return model
