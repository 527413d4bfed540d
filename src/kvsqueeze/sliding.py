"""The ``sliding`` recipe component: apply the recipe to sliding-window layers as well."""

from __future__ import annotations

from dataclasses import dataclass

from kvsqueeze.components import Component


@dataclass
class SlidingLayers(Component):
    """Compress sliding-window layers too (Mistral, Gemma 2/3, Phi-3, Qwen2 with
    ``use_sliding_window``).

    Without it a recipe leaves every sliding-window layer as transformers' own cache leaves it: its
    last ``window - 1`` tokens, uncompressed, since such a layer never holds more than its window.
    With it, the recipe's scorer, budget, merge, key reducer and quantizer act on those layers as on
    the full-attention ones (and the layer still lets go of what slid out of its window); there a
    ratio is a fraction of the ``window - 1`` tokens the layer would hold, not of the context. On a
    model whose every layer slides (Mistral), a recipe without it compresses nothing.
    """

    name = "sliding"
    kind = "layers"
    citation = "not a method: which layers the recipe compresses (all, not only full-attention ones)"


LAYER_CHOICES: dict[str, type[SlidingLayers]] = {SlidingLayers.name: SlidingLayers}
