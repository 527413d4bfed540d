"""The kvsqueeze server: OpenAI-compatible API, continuous batching, compressed context store.

``app`` (routes, auth, limits, SSE), ``scheduler`` (queues, admission, preemption), ``runner``
(model + tensors, one worker thread), ``store`` (RAM -> disk -> Redis), ``prefix`` (prefix
reuse), ``metrics`` (Prometheus text), ``cli`` (``kvsqueeze serve``).
"""
