"""DuoAttention / RazorAttention: full cache for retrieval heads, sinks + recent for streaming heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.budgets.base import Budget, protected_counts
from kvsqueeze.budgets.head_profile import HeadProfile, ProfileNotFoundError, find_profile
from kvsqueeze.components import option
from kvsqueeze.scorers.base import Scorer, ScoringInputs
from kvsqueeze.scorers.streaming import StreamingLLM


@dataclass
class DuoAttention(Budget):
    """Split KV heads into retrieval heads, which keep the whole context, and streaming heads,
    which keep only ``sinks`` first tokens and the ``recent`` latest ones.

    Which heads retrieve comes from the model's head profile (``kvsqueeze calibrate``, a
    training-free probe in the spirit of RazorAttention: the attention the answer of a passkey
    puts on the key in the context): the ``retrieval`` fraction of all KV heads with the highest
    scores, model-wide. Streaming heads rank by StreamingLLM whatever the recipe's scorer;
    retrieval heads keep the recipe's uniform budget chosen by its scorer, i.e. everything when
    the recipe has no ratio (``duo:retrieval=0.25``; ``snapkv+duo@0.5`` also evicts from
    retrieval heads). Protected tokens are kept on top. The memory saved is real: a streaming
    head stores ``sinks + recent`` tokens. Decode tokens are appended to every head (no
    decode-time eviction yet).

    Parameters
    ----------
    retrieval : fraction of KV heads kept whole (0 = all streaming, 1 = full cache).
    sinks : first tokens a streaming head keeps (attention sinks).
    recent : most recent tokens a streaming head keeps.
    profile : path of a head profile JSON; empty = the model's profile from
        ``$KVSQUEEZE_HOME/profiles`` or the one shipped with kvsqueeze.
    """

    name = "duo"
    citation = (
        "Xiao et al., 2024. DuoAttention: Efficient Long-Context LLM Inference with Retrieval and "
        "Streaming Heads. arXiv:2410.10819; Tang et al., 2024. RazorAttention, arXiv:2407.15891"
    )
    sets_own_counts = True

    retrieval: float = option(0.25, minimum=0, maximum=1)
    sinks: int = option(4, minimum=0)
    recent: int = option(64, minimum=0)
    profile: str = option("")

    def default_scorer(self) -> Scorer:
        return StreamingLLM(sinks=self.sinks)

    def head_profile(self, model_name: str) -> HeadProfile:
        return find_profile(model_name, self.profile)

    def retrieval_heads(self, config, state: dict) -> torch.Tensor:
        """``[layers, kv_heads]`` bool for the model of ``config`` (loaded once per cache)."""
        if "duo" not in state:
            name = getattr(config, "_name_or_path", "") if config is not None else ""
            profile = find_profile(name, self.profile)
            expected = _kv_shape(config) if config is not None else profile.shape
            if profile.shape != expected:
                raise ProfileNotFoundError(
                    f"head profile {profile.model!r} has {profile.shape[0]} layers x {profile.shape[1]} "
                    f"KV heads, the model has {expected[0]} x {expected[1]}; run `kvsqueeze calibrate "
                    f"--model {name}` for this model"
                )
            state["duo"] = profile.retrieval_heads(self.retrieval)
        return state["duo"]

    def allocate(
        self, ranking: torch.Tensor, inputs: ScoringInputs, counts: torch.Tensor, state: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        whole = self.retrieval_heads(inputs.config, state)[inputs.layer_idx].to(ranking.device)  # [Hkv]
        streaming = StreamingLLM(sinks=self.sinks).score(inputs)
        ranking = torch.where(whole[None, :, None], ranking, streaming.to(ranking.dtype))
        window = protected_counts(inputs) + self.sinks + self.recent
        counts = torch.where(whole[None, :], counts, torch.minimum(counts, window))
        return ranking, counts


def _kv_shape(config) -> tuple[int, int]:
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers, heads
