"""Prometheus metrics that neither vLLM nor Ray Serve export: requests, tokens and latency per
served model (vLLM labels its own with the base model only), and adapter loads.

They live in the replica's default registry beside vLLM's, so GET /metrics shows both.
"""

from __future__ import annotations

import time
from functools import cache


class AdapterMetrics:
    def __init__(self):
        from prometheus_client import Counter, Histogram

        self.requests = Counter("kore_requests", "Answered requests per served model",
                                ["model"])
        self.tokens = Counter("kore_generation_tokens", "Generated tokens per served model",
                              ["model"])
        self.latency = Histogram("kore_request_seconds", "Time to the whole answer per model",
                                 ["model"], buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.loads = Counter("kore_adapter_loads", "Adapters handed to the engine, by outcome",
                             ["outcome"])

    def answered(self, model: str, usage: dict | None, started: float) -> None:
        self.requests.labels(model=model).inc()
        self.latency.labels(model=model).observe(time.perf_counter() - started)
        if usage:
            self.tokens.labels(model=model).inc(usage.get("completion_tokens") or 0)


@cache
def adapter_metrics() -> AdapterMetrics:
    """One set per process (a metric may be registered only once)."""
    return AdapterMetrics()
