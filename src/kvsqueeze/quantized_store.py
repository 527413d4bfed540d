"""``QuantizedBody``: the quantized older tokens of every (batch, KV head), ragged.

Per-token tensors (codes, per-token scales, and the layer's ``slots``/``scores`` once stored) are
packed head after head like the rest of the cache; per-group tensors (per-channel key scales)
are packed the same way by groups. ``group_sizes`` counts the tokens left in each group, so
evicting a quantized token only drops its rows and never re-quantizes its neighbours.
"""

from __future__ import annotations

import torch

from kvsqueeze import ragged
from kvsqueeze.quantizers.base import Quantizer


class QuantizedBody:
    """Quantized tokens of one layer. ``lengths``/``group_counts`` are ``[B, Hkv]``."""

    def __init__(self, quantizer: Quantizer, batch: int, heads: int, device: torch.device):
        self.quantizer = quantizer
        self.tokens: dict[str, torch.Tensor] = {}
        self.groups: dict[str, torch.Tensor] = {}
        self.group_sizes = torch.zeros(0, dtype=torch.int32, device=device)
        self.lengths = torch.zeros(batch, heads, dtype=torch.long, device=device)
        self.group_counts = torch.zeros(batch, heads, dtype=torch.long, device=device)

    def append(self, keys: torch.Tensor, values: torch.Tensor, extra: dict, counts: torch.Tensor) -> None:
        """Quantize ``counts[b, h]`` tokens per head (a multiple of ``group_size``; packed
        ``keys``/``values`` ``[M, D]`` head after head) and put them after each head's body.
        ``extra`` holds other per-token fields (``slots``, ``scores``) to carry along."""
        group = self.quantizer.group_size
        per_token, per_group = self.quantizer.encode(keys, values)
        per_token.update(extra)
        new_groups = counts // group
        self.tokens = _concat_fields(self.tokens, self.lengths, per_token, counts)
        self.groups = _concat_fields(self.groups, self.group_counts, per_group, new_groups)
        sizes = torch.full((int(new_groups.sum()),), group, dtype=torch.int32, device=keys.device)
        self.group_sizes = ragged.concat(self.group_sizes, self.group_counts, sizes, new_groups)
        self.lengths = self.lengths + counts
        self.group_counts = self.group_counts + new_groups

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed float32 keys and values ``[N, D]`` of every quantized token."""
        if not self.tokens:
            raise ValueError("the quantized body is empty")
        return self.quantizer.decode(self.tokens, self.groups, self.group_sizes)

    def keep(self, keep: torch.Tensor) -> None:
        """Keep the packed tokens where ``keep [N]`` is True; empty groups disappear."""
        if not self.tokens:
            return
        flat_lengths = self.lengths.flatten()
        head_of_token = torch.repeat_interleave(
            torch.arange(flat_lengths.numel(), device=keep.device), flat_lengths
        )
        group_of_token = torch.repeat_interleave(
            torch.arange(self.group_sizes.numel(), device=keep.device), self.group_sizes.long()
        )
        sizes = torch.bincount(group_of_token[keep], minlength=self.group_sizes.numel())
        alive = sizes > 0
        head_of_group = torch.repeat_interleave(
            torch.arange(flat_lengths.numel(), device=keep.device), self.group_counts.flatten()
        )
        self.tokens = {name: t[keep] for name, t in self.tokens.items()}
        self.groups = {name: t[alive] for name, t in self.groups.items()}
        self.group_sizes = sizes[alive].to(torch.int32)
        shape = self.lengths.shape
        self.lengths = torch.bincount(head_of_token[keep], minlength=flat_lengths.numel()).view(shape)
        self.group_counts = torch.bincount(head_of_group[alive], minlength=flat_lengths.numel()).view(shape)

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (any order, repeats allowed)."""
        self.tokens = _select_fields(self.tokens, self.lengths, index)
        self.groups = _select_fields({**self.groups, "sizes": self.group_sizes}, self.group_counts, index)
        self.group_sizes = self.groups.pop("sizes")
        self.lengths = self.lengths[index]
        self.group_counts = self.group_counts[index]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor held, by name (``token.*``, ``group.*``, sizes and counts)."""
        named = {f"token.{name}": t for name, t in self.tokens.items()}
        named.update({f"group.{name}": t for name, t in self.groups.items()})
        named.update(group_sizes=self.group_sizes, lengths=self.lengths, group_counts=self.group_counts)
        return named

    @classmethod
    def from_tensors(cls, quantizer: Quantizer, named: dict[str, torch.Tensor]) -> QuantizedBody:
        body = cls(quantizer, *named["lengths"].shape, named["lengths"].device)
        body.tokens = {k.removeprefix("token."): t for k, t in named.items() if k.startswith("token.")}
        body.groups = {k.removeprefix("group."): t for k, t in named.items() if k.startswith("group.")}
        body.group_sizes, body.lengths, body.group_counts = (
            named["group_sizes"],
            named["lengths"],
            named["group_counts"],
        )
        return body

    @classmethod
    def cat(cls, bodies: list[QuantizedBody]) -> QuantizedBody:
        """Batch rows of ``bodies`` one after another (for stacking caches)."""
        names = set().union(*(body.tensors() for body in bodies))
        missing = [name for name in names if any(name not in body.tensors() for body in bodies)]
        if missing:
            raise ValueError(f"cannot stack quantized bodies holding different fields: {sorted(missing)}")
        return cls.from_tensors(
            bodies[0].quantizer,
            {name: torch.cat([body.tensors()[name] for body in bodies]) for name in names},
        )

    def validate(self) -> None:
        total, groups = int(self.lengths.sum()), int(self.group_counts.sum())
        for name, t in self.tokens.items():
            if t.shape[0] != total:
                raise ValueError(f"quantized {name} holds {t.shape[0]} tokens, lengths say {total}")
        for name, t in [*self.groups.items(), ("group_sizes", self.group_sizes)]:
            if t.shape[0] != groups:
                raise ValueError(f"quantized {name} holds {t.shape[0]} groups, counts say {groups}")
        if int(self.group_sizes.sum()) != total:
            raise ValueError("quantized group sizes do not add up to the tokens held")


def _concat_fields(old: dict, old_lengths: torch.Tensor, new: dict, new_lengths: torch.Tensor) -> dict:
    if not old:
        return dict(new)
    return {name: ragged.concat(old[name], old_lengths, new[name], new_lengths) for name in old}


def _select_fields(fields: dict, lengths: torch.Tensor, index: torch.Tensor) -> dict:
    return {name: ragged.select_rows(t, lengths, index) for name, t in fields.items()}
