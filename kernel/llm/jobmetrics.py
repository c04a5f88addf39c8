"""Histograms and counters of jobs' ends, for kernel/metrics (kernel/metrics.py).

Every job that ends passes through `Results.finished` once, on the trio thread:
that one place observes its time to first token, its length and its end state,
so a tool loop's job (whose text comes at the end) counts like any other. Tool
loops' steps are not jobs of their own and are not counted.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import Counter, Histogram
from prometheus_client.metrics_core import Metric

from .jobs import Job

LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class JobMetrics:
    def __init__(self) -> None:
        model = ["model"]
        self.ttft = Histogram(
            "aiosfs_job_ttft_seconds",
            "Time from a job's queueing to its first token, observed when the job ends (jobs that produced text).",
            model,
            registry=None,
            buckets=LATENCY,
        )
        self.duration = Histogram("aiosfs_job_duration_seconds", "Time from a job's queueing to its end.", model, registry=None, buckets=LATENCY)
        self.tokens = Histogram("aiosfs_job_generated_tokens", "Tokens a job generated, observed when it ends.", model, registry=None, buckets=TOKENS)
        self.finished = Counter("aiosfs_jobs_finished", "Jobs that ended, by state (done, error, cancelled).", ["model", "state"], registry=None)

    def ended(self, job: Job) -> None:
        """`job` has just ended (its state is final). Trio thread."""
        model = job.config.model
        if job.first_token_at:
            self.ttft.labels(model).observe(max(job.first_token_at - job.queued_at, 0.0))
        if job.finished_at:
            self.duration.labels(model).observe(max(job.finished_at - job.queued_at, 0.0))
        self.tokens.labels(model).observe(job.n_generated)
        self.finished.labels(model, job.state.value).inc()

    def collect(self) -> Iterator[Metric]:
        for metric in (self.ttft, self.duration, self.tokens, self.finished):
            yield from metric.collect()
