"""Histograms of an engine's steps, for kernel/metrics (kernel/metrics.py).

The engine thread observes each step that decoded tokens once, at its end: its
wall time, its host time (the step less llama_decode: planning, the process
boundary, sampling, the runner's Python) and its batch. That is four histogram
observations, about 2.5 µs a step, so they are taken as they happen rather than
estimated from counters. prometheus_client's histograms lock their own values,
so a scrape on another thread reads them safely. They belong to no registry:
the kernel's collector labels them with the engine's model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import Histogram
from prometheus_client.metrics_core import Metric

SECONDS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class StepMetrics:
    def __init__(self) -> None:
        self.step = Histogram("aiosfs_engine_step_seconds", "Wall time of an engine step that decoded tokens.", registry=None, buckets=SECONDS)
        self.host = Histogram(
            "aiosfs_engine_host_seconds",
            "Time of an engine step outside llama_decode: scheduling, the process boundary, sampling, Python.",
            registry=None,
            buckets=SECONDS,
        )
        self.seqs = Histogram("aiosfs_engine_batch_sequences", "Sequences decoded in an engine step.", registry=None, buckets=COUNTS)
        self.tokens = Histogram(
            "aiosfs_engine_batch_tokens", "Tokens (prompt and generated) decoded in an engine step.", registry=None, buckets=COUNTS
        )

    def observe(self, step_s: float, before: Mapping[str, float], after: Mapping[str, float]) -> None:
        """One step of `step_s` seconds; `before` and `after` are the core's counters
        (kernel/cores/wire.py STAT_KEYS) around it. Engine thread only."""
        tokens = after["batch_tokens"] - before["batch_tokens"]
        if tokens <= 0:  # cancels or switches only: no batch to describe
            return
        self.step.observe(step_s)
        self.host.observe(max(step_s - (after["decode_s"] - before["decode_s"]), 0.0))
        self.seqs.observe(after["batch_seqs"] - before["batch_seqs"])
        self.tokens.observe(tokens)

    def collect(self) -> Iterator[Metric]:
        for histogram in (self.step, self.host, self.seqs, self.tokens):
            yield from histogram.collect()
