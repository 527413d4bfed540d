"""Prometheus text exposition of the server's counters, gauges and histograms (no global registry).

One ``Metrics`` object per app; ``render`` produces the ``text/plain; version=0.0.4`` body.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class Metrics:
    """Counters (``inc``), histograms (``observe``) and gauges read at render time (``gauge``)."""

    def __init__(self, prefix: str = "kvsqueeze"):
        self.prefix = prefix
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}
        self._counters: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
        self._histograms: dict[str, dict[tuple, list[float]]] = defaultdict(dict)
        self._buckets: dict[str, tuple[float, ...]] = {}
        self._gauges: dict[str, Callable[[], float | dict[tuple, float]]] = {}

    def describe(self, name: str, kind: str, text: str, buckets: tuple[float, ...] | None = None) -> None:
        self._help[name] = (kind, text)
        if buckets is not None:
            self._buckets[name] = buckets

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        with self._lock:
            self._counters[name][tuple(sorted(labels.items()))] += amount

    def observe(self, name: str, value: float, **labels: str) -> None:
        buckets = self._buckets.get(name, TTFT_BUCKETS)
        key = tuple(sorted(labels.items()))
        with self._lock:
            state = self._histograms[name].setdefault(key, [0.0] * (len(buckets) + 2))
            for i, bound in enumerate(buckets):
                if value <= bound:
                    state[i] += 1
            state[-2] += 1  # count
            state[-1] += value  # sum

    def gauge(self, name: str, read: Callable[[], float | dict[tuple, float]]) -> None:
        """A value read when rendering; ``read`` may return ``{(("label", "v"),): value}``."""
        self._gauges[name] = read

    def counter_value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            counters = {n: dict(v) for n, v in self._counters.items()}
            histograms = {n: {k: list(s) for k, s in v.items()} for n, v in self._histograms.items()}
        names = sorted(set(self._help) | set(counters) | set(histograms) | set(self._gauges))
        for name in names:
            full = f"{self.prefix}_{name}"
            kind, text = self._help.get(name, ("untyped", name))
            lines += [f"# HELP {full} {text}", f"# TYPE {full} {kind}"]
            if name in self._gauges:
                value = self._gauges[name]()
                series = value if isinstance(value, dict) else {(): value}
                lines += [f"{full}{_labels(dict(k))} {float(v):g}" for k, v in series.items()]
            for key, value in counters.get(name, {}).items():
                lines.append(f"{full}{_labels(dict(key))} {value:g}")
            buckets = self._buckets.get(name, TTFT_BUCKETS)
            for key, state in histograms.get(name, {}).items():
                labels = dict(key)
                for bound, count in zip(buckets, state, strict=False):
                    lines.append(f"{full}_bucket{_labels({**labels, 'le': f'{bound:g}'})} {count:g}")
                lines.append(f"{full}_bucket{_labels({**labels, 'le': '+Inf'})} {state[-2]:g}")
                lines.append(f"{full}_count{_labels(labels)} {state[-2]:g}")
                lines.append(f"{full}_sum{_labels(labels)} {state[-1]:g}")
        return "\n".join(lines) + "\n"
