"""Evaluation harness: RULER-style tasks, shared-context multi-turn, fidelity, reports and plots.

- ``tasks``: offline, seeded task generators (``make_sample``) and suites.
- ``metrics``: RULER string match and logit fidelity.
- ``runner``: ``EvalConfig`` + ``run_eval`` (one JSON line per finished sample, resumable).
- ``report`` / ``plots``: ``summary.md`` and PNG plots rendered from ``results.jsonl``.
- ``leaderboard``: the every-method preset behind ``benchmarks/leaderboard.py``.
"""
