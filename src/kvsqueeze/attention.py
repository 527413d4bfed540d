"""The attention function over paged storage, and the hooks that drive the compression step.

Registered as the attention implementation ``"kvsqueeze"`` (plus transformers' SDPA mask
function under the same name, so padding/sliding-window masks are materialised). The model calls
``cache.update`` and hands us what it returned; the key tensor leads back to the cache layer.
A decode step on the CPU runs the compiled kernel over the blocks where they are
(``kvsqueeze.kernels``); otherwise the layer's blocks are gathered per head (quantized ones
decoded) into one workspace and attended with SDPA under a per-head mask gathered at the stored
slots. During a forward the cache compresses, the function also records what the recipe asks for
(``kvsqueeze.compression.Observation``), and during decoding with a decoding component it keeps
the latest queries (``RecentQueries``). It never evicts: ``install`` hooks the model so that the
cache compresses when each forward ends. With any other cache the function is plain SDPA.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvsqueeze.cache import CompressedCache
from kvsqueeze.compression import Observation
from kvsqueeze.kernels.decode import fused_decode
from kvsqueeze.scorers.base import ScoringInputs
from kvsqueeze.storage.layer import HeldTokens, PagedLayer

ATTENTION_NAME = "kvsqueeze"

QUERY_BLOCK = 128
"""Queries of a masked prefill attended at a time (bounds SDPA's float copy of the mask)."""


def held_mask(
    attention_mask: torch.Tensor | None, held: HeldTokens, seen: int, q_len: int
) -> torch.Tensor | None:
    """Which held entries each query may see: ``[B, 1 or Hkv, q, L]`` bool, or None (all).

    ``attention_mask`` is the model's 4D mask ``[B, 1, q, T]`` over slots (bool or additive
    float; None when transformers found nothing to mask); its columns are gathered at each
    head's slots. Without one, every held token is visible, in causal order among the new ones
    (None: the layer holds exactly the forward's tokens, SDPA's ``is_causal``).
    """
    if attention_mask is None:
        if held.valid is None:
            return None
        mask = held.valid[:, :, None, :]
        if q_len > 1:
            query_slots = torch.arange(seen - q_len, seen, device=held.keys.device)
            mask = mask & (held.slots[:, :, None, :] <= query_slots[:, None])
        return mask
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    length = held.keys.shape[2]
    if held.contiguous:
        return attention_mask[..., seen - length : seen]
    batch, heads, _ = held.slots.shape
    index = held.slots.clamp(min=0)[:, :, None, :].expand(batch, heads, q_len, length)
    gathered = attention_mask.expand(batch, heads, q_len, -1).gather(-1, index)
    return gathered & (held.slots >= 0)[:, :, None, :]


def grouped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of ``query [B, Hq, q, D]`` over ``key``/``value`` ``[B, Hkv, L, D]`` with a mask
    per KV head ``[B, 1 or Hkv, q, L]`` (None: causal among the last ``q`` keys, which then are
    all the keys). Returns ``[B, q, Hq, D]``.

    Keys and values are never repeated for the ``n_rep`` query heads sharing a KV head: a decode
    step folds them into the query axis (``[B, Hkv, n_rep, D]``); a longer forward attends each
    (row, KV head) as one batch entry with its ``n_rep`` query heads (GQA), so its mask is never
    repeated either. ``softcap`` (Gemma 2) caps the logits with ``tanh`` before the softmax. Fully
    masked rows (padding queries) give finite garbage, as in transformers, instead of NaN.
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    n_rep = q_heads // kv_heads
    if softcap is not None:
        return _capped_attention(query, key, value, mask, scaling, softcap)
    if q_len == 1:
        folded = query.reshape(batch, kv_heads, n_rep, dim)
        out = torch.nn.functional.scaled_dot_product_attention(
            folded, key, value, attn_mask=mask, scale=scaling
        )
        return out.reshape(batch, 1, q_heads, -1)
    entries = batch * kv_heads
    queries = query.reshape(entries, n_rep, q_len, dim)
    keys, values = key.reshape(entries, 1, length, dim), value.reshape(entries, 1, length, -1)
    if mask is None:
        out = torch.nn.functional.scaled_dot_product_attention(
            queries, keys, values, is_causal=True, scale=scaling, enable_gqa=n_rep > 1
        )
    else:  # in blocks of queries: SDPA turns its mask into floats, a [q, L] copy per head
        mask = mask.expand(batch, kv_heads, q_len, length).reshape(entries, 1, q_len, length)
        out = torch.cat(
            [
                torch.nn.functional.scaled_dot_product_attention(
                    queries[:, :, start : start + QUERY_BLOCK],
                    keys,
                    values,
                    attn_mask=mask[:, :, start : start + QUERY_BLOCK],
                    scale=scaling,
                    enable_gqa=n_rep > 1,
                )
                for start in range(0, q_len, QUERY_BLOCK)
            ],
            dim=2,
        )
    return out.reshape(batch, q_heads, q_len, -1).transpose(1, 2).contiguous()


def _capped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float,
) -> torch.Tensor:
    """``grouped_attention`` with the logits capped at ``softcap`` (``tanh``), computed eagerly."""
    batch, q_heads, q_len, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    folded = query.reshape(batch, kv_heads, q_heads // kv_heads, q_len, dim)
    logits = torch.einsum("bhrqd,bhld->bhrql", folded, key) * (scaling if scaling is not None else dim**-0.5)
    logits = torch.tanh(logits / softcap) * softcap
    if mask is None and q_len > 1:  # causal among the new tokens, which are all the keys
        mask = torch.ones(q_len, length, dtype=torch.bool, device=query.device).tril(length - q_len)[
            None, None
        ]
    if mask is not None:
        logits = logits.masked_fill(~mask[:, :, None], torch.finfo(logits.dtype).min)
    out = torch.einsum("bhrql,bhld->bhrqd", logits.softmax(-1), value)
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
    layer: PagedLayer | None = getattr(key, "kvsqueeze_layer", None)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    q_len = query.shape[2]
    if q_len == 1 and layer.cache.decodes(layer):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        layer.cache.observe_decode(module.layer_idx, query, attention_mask, scale, kwargs.get("position_ids"))
    if q_len == 1:
        lower = layer.cache.first_visible(attention_mask, query.shape[0], query.device)
        if lower is not None:
            output = fused_decode(layer, query, scaling, kwargs.get("softcap"), lower)
            if output is not None:
                return output, None
    held = layer.held_tokens(query.dtype, layer.cache.workspace)
    mask = held_mask(attention_mask, held, layer.seen, q_len)
    output = grouped_attention(query, held.keys, held.values, mask, scaling, kwargs.get("softcap"))
    if layer.cache.compresses(layer, q_len):
        layer.cache.observe(module.layer_idx, observe(layer, held, query, attention_mask, scaling, kwargs))
    return output, None


def observe(
    layer: PagedLayer,
    held: HeldTokens,
    query: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    kwargs: dict,
) -> Observation:
    """What the compression step will need of this forward: the last queries the recipe reads
    and the attention statistics its scorer computes over every query (see ``Observation``)."""
    recipe = layer.recipe
    batch, _, q_len, dim = query.shape
    query_slots = torch.arange(layer.seen - q_len, layer.seen, device=query.device).expand(batch, q_len)
    positions = kwargs.get("position_ids")
    positions = query_slots if positions is None else positions.expand(batch, q_len)
    scale = scaling if scaling is not None else dim**-0.5
    # copies, not views: a view would keep the whole chunk's queries and mask alive until compression
    last_row = None if attention_mask is None else attention_mask[:, 0, -1, :].clone()
    if last_row is not None and last_row.dtype != torch.bool:
        last_row = last_row > torch.finfo(last_row.dtype).min / 2
    window = min(recipe.observed_queries(), q_len)
    observation = Observation(
        queries=query[:, :, q_len - window :].clone(),
        query_positions=positions[:, q_len - window :].clone(),
        query_slots=query_slots[:, q_len - window :].clone(),
        scaling=scale,
        last_row=last_row,
        new_slots=range(layer.seen - q_len, layer.seen),
    )
    if recipe.evicts and recipe.scorer.statistics:
        valid = held.slots >= 0
        if last_row is not None:
            valid = valid & last_row[:, None, :].expand(-1, held.slots.shape[1], -1).gather(
                -1, held.slots.clamp(min=0)
            )
        inputs = ScoringInputs(
            keys=held.keys,
            values=held.values,
            slots=held.slots,
            valid=valid,
            queries=query,
            query_positions=positions,
            query_slots=query_slots,
            scaling=scale,
        )
        for name in recipe.scorer.statistics:
            stat = getattr(inputs, name)()  # [B, Hkv, n_rep, L]
            by_slot = stat.new_zeros(*stat.shape[:3], layer.seen)
            index = held.slots.clamp(min=0)[:, :, None].expand_as(stat)
            observation.statistics[name] = by_slot.scatter(-1, index, stat.masked_fill(~valid[:, :, None], 0))
    return observation


def _begin_forward(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    cache = kwargs.get("past_key_values")
    if isinstance(cache, CompressedCache):
        cache.configure(module.config)


def _end_forward(module: torch.nn.Module, args: tuple, kwargs: dict, output) -> None:
    cache = kwargs.get("past_key_values")
    if isinstance(cache, CompressedCache):
        cache.end_forward()


def register() -> None:
    """Register the attention and mask functions under ``"kvsqueeze"`` (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, kvsqueeze_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def install(model: PreTrainedModel) -> PreTrainedModel:
    """Make ``model`` run its attention through kvsqueeze (harmless with other caches) and
    compress a ``CompressedCache`` at the end of every forward (idempotent)."""
    register()
    model.set_attn_implementation(ATTENTION_NAME)
    decoder = model.base_model
    if not getattr(decoder, "_kvsqueeze_hooked", False):
        decoder.register_forward_pre_hook(_begin_forward, with_kwargs=True)
        decoder.register_forward_hook(_end_forward, with_kwargs=True)
        decoder._kvsqueeze_hooked = True
    return model
