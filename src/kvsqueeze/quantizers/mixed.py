"""Mixed precision by importance: the tokens a scorer would evict are kept in fewer bits instead."""

from __future__ import annotations

from dataclasses import dataclass

from kvsqueeze.components import option
from kvsqueeze.quantizers.base import Quantizer
from kvsqueeze.quantizers.kivi import CODE_BITS, KIVI


@dataclass
class MixedPrecision(Quantizer):
    """Two KIVI tiers: important tokens in ``high_bits``, the rest in ``low_bits``; none evicted.

    With a scorer and a ratio (``snapkv+mixed@0.75``) the scorer's choice decides the precision
    instead of survival: the tokens it keeps age into the ``high_bits`` tier like any KIVI cache,
    the ``ratio`` share it would evict is quantized once, from its 16-bit values, into the
    ``low_bits`` tier (MiKV's "no token left behind"; ZipCache's salient/non-salient split). A
    quantized token keeps its tier: later compression steps rank only the 16-bit tokens against
    each other (the others are kept, never re-quantized). The tokens generated after compression
    enter the high tier. Without a ratio every token is high.

    Parameters
    ----------
    high_bits, low_bits : code widths of the two tiers (2, 4 or 8; low_bits <= high_bits).
    group_size, residual : as in KIVI, for both tiers (a demoted head's last group may be short).
    """

    name = "mixed"
    citation = (
        "Yang et al., 2024. No Token Left Behind: Reliable KV Cache Compression via Importance-Aware "
        "Mixed Precision Quantization (MiKV). arXiv:2402.18096"
    )
    demotes = True

    high_bits: int = option(4, choices=CODE_BITS)
    low_bits: int = option(2, choices=CODE_BITS)
    # the cache's block size: beyond a few hundred tokens a block is mostly unfilled capacity
    group_size: int = option(32, minimum=1, maximum=256)
    residual: int = option(32, minimum=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.low_bits > self.high_bits:
            raise ValueError(
                f"mixed:low_bits ({self.low_bits}) must not exceed mixed:high_bits ({self.high_bits})"
            )
        self.high = KIVI(self.high_bits, self.group_size, self.residual)
        self.low = KIVI(self.low_bits, self.group_size, self.residual)

    def tiers(self) -> list[Quantizer]:
        return [self.low, self.high]
