"""KVzap: KVzip's score predicted in one ordinary prefill by a small fitted model per layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.components import option
from kvsqueeze.scorers.base import NEVER_EVICT, Scorer, ScoringInputs, first_valid
from kvsqueeze.scorers.predictor import PredictorNotFoundError, ScorePredictor, find_predictor, token_features


@dataclass
class KVzap(Scorer):
    """Keep the tokens KVzip would keep, without its reconstruction pass.

    Predicts, per (token, KV head), the log of KVzip's score (the largest attention the
    reconstruction queries give the token): a linear map per (layer, KV head) of the token's
    post-RoPE key and value (``kvsqueeze.scorers.predictor.token_features``: key RoPE-pair norms
    and the value), fitted by ridge regression on KVzip's scores of the standard library's docstrings
    (``kvsqueeze calibrate --target kvzip``). ``[B, Hkv, L, D] -> [B, Hkv, L]``. A log is
    monotone, so the ranking is on KVzip's scale across layers and ``kvzap+global`` shares one
    threshold as ``kvzip+global`` does. It reads no queries, so it scores during the ordinary
    (chunked) prefill. The first ``sinks`` valid tokens score ``NEVER_EVICT``.

    Parameters
    ----------
    sinks : number of initial tokens always kept (attention sinks).
    weights : path of a fitted model's JSON; empty = the model's from ``$KVSQUEEZE_HOME/kvzap``
        or the one shipped with kvsqueeze.
    """

    name = "kvzap"
    citation = "Jeblick & Jegou, 2026. KVzap: Fast, Adaptive, and Faithful KV Cache Pruning. arXiv:2601.07891"

    sinks: int = option(4, minimum=0)
    weights: str = option("")

    def predictor(self, config) -> ScorePredictor:
        """The fitted model for ``config``'s model (loaded once per scorer), shape-checked."""
        name = getattr(config, "_name_or_path", "") if config is not None else ""
        if getattr(self, "_loaded", None) is None or self._loaded[0] != name:
            predictor = find_predictor(name, self.weights)
            if config is not None:
                heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
                head_dim = (
                    getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
                )
                expected = (config.num_hidden_layers, heads, head_dim // 2 + head_dim)
                if predictor.shape != expected:
                    raise PredictorNotFoundError(
                        f"kvzap weights for {predictor.model!r} are {predictor.shape} (layers, KV heads, "
                        f"features), the model needs {expected}; run `kvsqueeze calibrate --model {name} "
                        "--target kvzip` for this model"
                    )
            self._loaded = (name, predictor)
        return self._loaded[1]

    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        features = token_features(inputs.keys, inputs.values)
        scores = self.predictor(inputs.config).predict(inputs.layer_idx, features)
        return scores.masked_fill(first_valid(inputs.valid, self.sinks), NEVER_EVICT)
