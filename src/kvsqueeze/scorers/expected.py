"""Expected Attention: score keys by the attention that future queries are expected to pay them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.components import option
from kvsqueeze.scorers.base import NEVER_EVICT, Scorer, ScoringInputs, first_valid


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_unrotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Undo Hugging Face RoPE: ``x`` ``[..., q, D]`` rotated at ``positions`` ``[..., q]`` -> pre-RoPE.

    HF pairs dim ``i`` with ``i + D/2``, both at frequency ``inv_freq[i]`` (``[D/2]``).
    """
    angles = positions.float()[..., None] * inv_freq.float()
    cos, sin = torch.cat((angles, angles), dim=-1).cos(), torch.cat((angles, angles), dim=-1).sin()
    return x * cos - _rotate_half(x) * sin


def mean_rope_rotation(first: torch.Tensor, count: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """``[B, D, D]`` RoPE rotation matrix averaged over positions ``first[b] .. first[b] + count - 1``.

    Block form ``[[C, -S], [S, C]]`` with ``C``/``S`` the diagonal mean cos/sin per frequency, so
    ``R @ x`` equals the mean over those positions of the HF-rotated ``x``.
    """
    positions = first[:, None].float() + torch.arange(count, device=first.device)
    angles = positions[..., None] * inv_freq.float()
    cos, sin = torch.diag_embed(angles.cos().mean(1)), torch.diag_embed(angles.sin().mean(1))
    return torch.cat((torch.cat((cos, -sin), -1), torch.cat((sin, cos), -1)), -2)


@dataclass
class ExpectedAttention(Scorer):
    """Keep the tokens that future queries are expected to attend to (times their value norm).

    Future queries of each query head are modelled as Gaussian: mean ``mu`` and covariance
    ``Sigma`` of the last ``window`` pre-RoPE queries, rotated by the RoPE matrix ``R`` averaged over
    the next ``future`` positions. A key then gets the expected logit
    ``scale * (R mu)·k + scale^2 / 2 * k^T (R Sigma R^T) k``; these are softmaxed over the valid,
    non-sink candidates, averaged over the ``n_rep`` query heads of each KV head and multiplied
    by ``||v||``. The first ``sinks`` valid tokens score ``NEVER_EVICT``. ``[B, Hkv, L]``.

    Parameters
    ----------
    window : number of most recent queries the statistics are estimated from.
    future : number of future positions the RoPE rotation is averaged over.
    sinks : number of initial valid tokens always kept (and left out of the softmax).
    use_covariance : include the ``Sigma`` term (otherwise the queries are taken as constant).
    use_value_norm : rescale the expected attention as ``(score + epsilon) * ||v||``.
    epsilon : added to the expected attention before the value-norm rescaling.
    """

    name = "expected"
    citation = (
        "Devoto et al., 2025. Expected Attention: KV Cache Compression by Estimating Attention from "
        "Future Queries Distribution. arXiv:2510.00636"
    )

    window: int = option(64, minimum=1)
    future: int = option(512, minimum=1)
    sinks: int = option(4, minimum=0)
    use_covariance: bool = option(True)
    use_value_norm: bool = option(True)
    # added to attention probabilities (<= 1): larger values drown the attention out of the score
    epsilon: float = option(0.0, minimum=0, maximum=1)

    def observed_queries(self) -> int:
        return self.window

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        if inputs.rope_inv_freq is None:
            raise ValueError("expected attention needs rope_inv_freq (the model's RoPE inverse frequencies)")
        batch, kv_heads, _, dim = inputs.keys.shape
        inv_freq = inputs.rope_inv_freq.to(inputs.keys.device)
        start = max(inputs.num_queries - self.window, 0)
        positions = inputs.query_positions[:, None, start:]
        queries = rope_unrotate(inputs.queries[:, :, start:].float(), positions, inv_freq)
        # left-padding queries see no valid candidate; keep them out of the statistics
        real = inputs.query_mask(start).any(-1).repeat_interleave(inputs.n_rep, dim=1).float()
        weights = real / real.sum(-1, keepdim=True).clamp(min=1)
        mu = torch.einsum("bhq,bhqd->bhd", weights, queries)
        rotation = mean_rope_rotation(inputs.query_positions[:, -1] + 1, self.future, inv_freq)

        keys = inputs.keys.float()
        mean = torch.einsum("bde,bhe->bhd", rotation, mu).reshape(batch, kv_heads, -1, dim)
        logits = torch.einsum("bhrd,bhld->bhrl", mean, keys) * inputs.scaling
        if self.use_covariance:
            centred = queries - mu[:, :, None]
            cov = torch.einsum("bhq,bhqd,bhqe->bhde", weights, centred, centred)
            cov = (rotation[:, None] @ cov @ rotation[:, None].mT).reshape(batch, kv_heads, -1, dim, dim)
            spread = (torch.einsum("bhrde,bhle->bhrld", cov, keys) * keys[:, :, None]).sum(-1)
            logits = logits + 0.5 * inputs.scaling**2 * spread

        sinks = first_valid(inputs.valid, self.sinks)
        logits = logits.masked_fill(~(inputs.valid & ~sinks)[:, :, None], -torch.inf)
        expected = torch.softmax(logits, dim=-1).nan_to_num(0.0).mean(2)
        if self.use_value_norm:
            expected = (expected + self.epsilon) * inputs.values.float().norm(dim=-1)
        return expected.masked_fill(sinks, NEVER_EVICT)
