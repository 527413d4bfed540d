"""``QuantizedBody``: the quantized older tokens of every (batch, KV head), ragged.
``MixedBody``: two of them in different precisions (the ``mixed`` quantizer).

Per-token tensors (codes, per-token scales, and the layer's ``slots``/``scores`` once stored) are
packed head after head like the rest of the cache; per-group tensors (per-channel key scales)
are packed the same way by groups. ``group_sizes`` counts the tokens left in each group, so
evicting a quantized token only drops its rows and never re-quantizes its neighbours.
"""

from __future__ import annotations

import torch

from kvsqueeze import ragged
from kvsqueeze.quantizers.base import Quantizer
from kvsqueeze.quantizers.mixed import MixedPrecision


class QuantizedBody:
    """Quantized tokens of one layer. ``lengths``/``group_counts`` are ``[B, Hkv]``."""

    def __init__(self, quantizer: Quantizer, batch: int, heads: int, device: torch.device):
        self.quantizer = quantizer
        self.tokens: dict[str, torch.Tensor] = {}
        self.groups: dict[str, torch.Tensor] = {}
        self.group_sizes = torch.zeros(0, dtype=torch.int32, device=device)
        self.lengths = torch.zeros(batch, heads, dtype=torch.long, device=device)
        self.group_counts = torch.zeros(batch, heads, dtype=torch.long, device=device)

    @property
    def empty(self) -> bool:
        return not self.tokens

    def field(self, name: str) -> torch.Tensor | None:
        """The packed per-token tensor ``name`` (``slots``, ``scores``), or None if not held."""
        return self.tokens.get(name)

    def set_field(self, name: str, packed: torch.Tensor) -> None:
        self.tokens[name] = packed

    def append(self, keys: torch.Tensor, values: torch.Tensor, extra: dict, counts: torch.Tensor) -> None:
        """Quantize ``counts[b, h]`` tokens per head (packed ``keys``/``values`` ``[M, D]`` head
        after head) and put them after each head's body, in groups of ``group_size`` tokens (the
        last group of a head may be shorter). ``extra`` holds other per-token fields (``slots``,
        ``scores``) to carry along."""
        group = self.quantizer.group_size
        new_groups = (counts + group - 1) // group
        sizes = _group_sizes(counts, group)
        # a short group is filled up with copies of its first token: per-channel min/max unchanged
        starts = torch.cumsum(sizes, 0) - sizes
        offset = torch.arange(group, device=keys.device)
        index = torch.where(offset < sizes[:, None], starts[:, None] + offset, starts[:, None]).flatten()
        per_token, per_group = self.quantizer.encode(keys[index], values[index])
        real = (offset < sizes[:, None]).flatten()
        per_token = {name: t[real] for name, t in per_token.items()}
        per_token.update(extra)
        self.tokens = _concat_fields(self.tokens, self.lengths, per_token, counts)
        self.groups = _concat_fields(self.groups, self.group_counts, per_group, new_groups)
        sizes = sizes.to(torch.int32)
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
        body.tokens, body.groups = with_prefix(named, "token."), with_prefix(named, "group.")
        body.group_sizes, body.lengths, body.group_counts = (
            named["group_sizes"],
            named["lengths"],
            named["group_counts"],
        )
        return body

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


class MixedBody:
    """Quantized tokens in two tiers: per head, the ``low`` tier (demoted tokens) then ``high``.

    Offers ``QuantizedBody``'s interface over both tiers; ``append`` (tokens leaving the recent
    window) feeds the high tier, ``demote`` the low one.
    """

    def __init__(self, quantizer: MixedPrecision, low: QuantizedBody, high: QuantizedBody):
        self.quantizer, self.low, self.high = quantizer, low, high

    @property
    def tiers(self) -> tuple[QuantizedBody, QuantizedBody]:
        return self.low, self.high

    @property
    def lengths(self) -> torch.Tensor:
        return self.low.lengths + self.high.lengths

    @property
    def empty(self) -> bool:
        return self.low.empty and self.high.empty

    def _joined(self, parts: list[torch.Tensor | None]) -> torch.Tensor | None:
        held = [(part, tier.lengths) for part, tier in zip(parts, self.tiers, strict=True) if not tier.empty]
        if not held or any(part is None for part, _ in held):
            return None
        return held[0][0] if len(held) == 1 else ragged.concat(*held[0], *held[1])

    def _split(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ragged.split(packed, self.low.lengths, self.high.lengths)

    def field(self, name: str) -> torch.Tensor | None:
        return self._joined([tier.field(name) for tier in self.tiers])

    def set_field(self, name: str, packed: torch.Tensor) -> None:
        for tier, part in zip(self.tiers, self._split(packed), strict=True):
            if not tier.empty:
                tier.set_field(name, part)

    def append(self, keys: torch.Tensor, values: torch.Tensor, extra: dict, counts: torch.Tensor) -> None:
        self.high.append(keys, values, extra, counts)

    def demote(self, keys: torch.Tensor, values: torch.Tensor, extra: dict, counts: torch.Tensor) -> None:
        """Quantize ``counts[b, h]`` tokens per head into the low tier (after its tokens)."""
        self.low.append(keys, values, extra, counts)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        decoded = [tier.dequantized() if not tier.empty else (None, None) for tier in self.tiers]
        return self._joined([keys for keys, _ in decoded]), self._joined([values for _, values in decoded])

    def keep(self, keep: torch.Tensor) -> None:
        for tier, part in zip(self.tiers, self._split(keep), strict=True):
            tier.keep(part)

    def select_rows(self, index: torch.Tensor) -> None:
        for tier in self.tiers:
            tier.select_rows(index)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            f"{label}.{name}": t
            for label, tier in zip(("low", "high"), self.tiers, strict=True)
            for name, t in tier.tensors().items()
        }

    @classmethod
    def from_tensors(cls, quantizer: MixedPrecision, named: dict[str, torch.Tensor]) -> MixedBody:
        low = QuantizedBody.from_tensors(quantizer.low, with_prefix(named, "low."))
        return cls(quantizer, low, QuantizedBody.from_tensors(quantizer.high, with_prefix(named, "high.")))

    def validate(self) -> None:
        for tier in self.tiers:
            tier.validate()


Body = QuantizedBody | MixedBody


def new_body(quantizer: Quantizer, batch: int, heads: int, device: torch.device) -> Body:
    """The empty quantized storage ``quantizer`` needs."""
    if isinstance(quantizer, MixedPrecision):
        tiers = (QuantizedBody(q, batch, heads, device) for q in (quantizer.low, quantizer.high))
        return MixedBody(quantizer, *tiers)
    return QuantizedBody(quantizer, batch, heads, device)


def body_from_tensors(quantizer: Quantizer, named: dict[str, torch.Tensor]) -> Body:
    """Rebuild what ``body.tensors()`` returned."""
    kind = MixedBody if isinstance(quantizer, MixedPrecision) else QuantizedBody
    return kind.from_tensors(quantizer, named)


def with_prefix(named: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``named`` whose name starts with ``prefix``, prefix removed."""
    return {name.removeprefix(prefix): t for name, t in named.items() if name.startswith(prefix)}


def _group_sizes(counts: torch.Tensor, group: int) -> torch.Tensor:
    """Sizes of the groups that ``counts [B, H]`` tokens per head form, head after head."""
    flat = counts.flatten()
    full, rest = flat // group, flat % group
    per_head = torch.stack([full, (rest > 0).long()], dim=-1)
    sizes = torch.tensor([group, 0], device=counts.device).expand_as(per_head).clone()
    sizes[:, 1] = rest
    return torch.repeat_interleave(sizes.flatten(), per_head.flatten())


def _concat_fields(old: dict, old_lengths: torch.Tensor, new: dict, new_lengths: torch.Tensor) -> dict:
    if not old:
        return dict(new)
    return {name: ragged.concat(old[name], old_lengths, new[name], new_lengths) for name in old}


def _select_fields(fields: dict, lengths: torch.Tensor, index: torch.Tensor) -> dict:
    return {name: ragged.select_rows(t, lengths, index) for name, t in fields.items()}
