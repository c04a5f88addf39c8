"""kernel/metrics: the kernel's counters in the Prometheus text format.

So that Prometheus, or node_exporter's textfile collector, reads a mount with no
adapter: what `kernel/stats` shows, as typed metrics with units in their names and
a `model` label, and the histograms that a total cannot give: each engine step's
time, host time and batch (kernel/cores/stepmetrics.py), each job's time to first
token, duration and length (kernel/llm/jobmetrics.py).

The collector reads the kernel's tables when it is scraped, so it runs on the trio
thread, as `cat kernel/stats` does (aiosfs/metrics.py brings HTTP scrapes there).
Each kernel has a registry of its own: the process-wide default one would mix the
kernels of one test process, and keep the engines of models unloaded since.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .cores.engine import Engine
from .kernel import Kernel

# A local engine's kernel/stats counters (docs/protocol.md §6): (key, metric without
# `_total`, help, factor to the metric's unit)
ENGINE_COUNTERS = [
    ("decode_s", "aiosfs_engine_decode_seconds", "Time spent in llama_decode.", 1.0),
    ("sample_s", "aiosfs_engine_sample_seconds", "Time spent sampling and detokenizing after llama_decode.", 1.0),
    ("generated", "aiosfs_generated_tokens", "Tokens sampled and delivered.", 1.0),
    ("prompt_tokens", "aiosfs_prompt_tokens", "Prompt tokens prefilled, recomputed ones included.", 1.0),
    ("preemptions", "aiosfs_engine_preemptions", "Running jobs switched out by the scheduling policy.", 1.0),
    ("free_steps", "aiosfs_engine_free_steps", "Steps the engine process took on its own while the daemon's next plan was late.", 1.0),
    ("swaps_out", "aiosfs_engine_swaps_out", "Job sequences saved to RAM.", 1.0),
    ("swaps_in", "aiosfs_engine_swaps_in", "Job sequences restored from RAM.", 1.0),
    ("swap_bytes", "aiosfs_kv_swap_bytes", "Bytes of KV state saved to RAM.", 1.0),
    ("swap_ms", "aiosfs_engine_swap_seconds", "Time spent switching jobs out and in.", 0.001),
    ("recomputes", "aiosfs_engine_recomputes", "Switched-out jobs resumed by recomputing their tokens.", 1.0),
    ("prefix_hit_tokens", "aiosfs_kv_prefix_reused_tokens", "Prompt tokens not prefilled because the agent's cached sequence held them.", 1.0),
    ("shared_prefix_hits", "aiosfs_kv_shared_prefix_hits", "Jobs that started on a copy of another sequence's cells (shared prefix).", 1.0),
    ("shared_prefix_tokens", "aiosfs_kv_shared_prefix_tokens", "Prompt tokens not prefilled because of a shared prefix.", 1.0),
    ("cache_evictions", "aiosfs_kv_cache_evictions", "Idle cached sequences moved out of their slot.", 1.0),
    ("kv_restores", "aiosfs_kv_restores", "Sequences read back from their files on disk (hibernation) instead of prefilled.", 1.0),
    ("kv_restore_tokens", "aiosfs_kv_restored_tokens", "Prompt tokens not prefilled because a file on disk held them.", 1.0),
    ("kv_hibernated", "aiosfs_kv_hibernated", "Sequences written to disk.", 1.0),
    ("kv_disk_discarded", "aiosfs_kv_disk_discarded", "Files on disk discarded: another model, build or context, truncated or corrupt.", 1.0),
    ("engine_errors", "aiosfs_engine_step_errors", "Engine steps that failed with an internal error.", 1.0),
    ("decode_errors", "aiosfs_engine_decode_errors", "Steps whose llama_decode failed.", 1.0),
    ("engine_restarts", "aiosfs_engine_restarts", "Engine processes started again after a crash or a hang.", 1.0),
]
ENGINE_GAUGES = [
    ("cached_sequences", "aiosfs_kv_cached_sequences", "Agents with a cached sequence, in a slot or in RAM."),
    ("swapped_bytes", "aiosfs_kv_swapped_bytes", "Bytes of saved KV state held in RAM now."),
    ("kv_disk_bytes", "aiosfs_kv_disk_bytes", "Bytes of the engine's KV files on disk now (hibernation)."),
]


class KernelCollector(Collector):
    """The metrics of one kernel, read at each scrape. Trio thread only."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel

    def collect(self) -> Iterator[Metric]:
        k = self.kernel
        engines = {name: engine for name in k.cores if (engine := k.cores.local(name)) is not None}
        yield from _engines(engines)
        yield from _merged([({"model": name}, engine.step_metrics.collect()) for name, engine in engines.items()])
        yield from _merged([({}, k.requests.results.metrics.collect())])  # labelled with their model already
        queued = GaugeMetricFamily("aiosfs_queued_jobs", "Jobs in a core's queue, switched-out and suspended ones included.", labels=["model"])
        yield _by_model(queued, {name: len(core.queue.queued()) for name, core in k.cores.items()})
        running = GaugeMetricFamily("aiosfs_running_jobs", "Sequences a core is decoding (suspended ones not counted).", labels=["model"])
        yield _by_model(running, {name: core.running() for name, core in k.cores.items()})
        yield from self._kernel_wide()

    def _kernel_wide(self) -> Iterator[Metric]:
        k = self.kernel
        waiting = k.requests.waiting_turns()
        yield GaugeMetricFamily(
            "aiosfs_waiting_turns", "Prompt jobs waiting behind their agent's running turn (in no core's queue yet).", value=waiting
        )
        yield GaugeMetricFamily("aiosfs_agents", "Agents that exist.", value=len(k.agents))
        memory = GaugeMetricFamily("aiosfs_memory_bytes", "Bytes of an agent's memory/ files and symlinks (what its quota counts).", labels=["agent"])
        for name, agent in sorted(k.agents.items()):
            memory.add_metric([name], k.memory.store.usage(agent.row.id))
        yield memory
        cache = k.memory.store.statistics()["memory_cache_bytes"]
        yield GaugeMetricFamily("aiosfs_memory_cache_bytes", "Bytes of memory/ file contents cached in RAM.", value=cache)


def _engines(engines: Mapping[str, Engine]) -> Iterator[Metric]:
    """The local engines' counters and gauges, by model."""
    stats = {name: engine.statistics() for name, engine in engines.items()}
    for key, metric, text, factor in ENGINE_COUNTERS:
        yield _by_model(CounterMetricFamily(metric, text, labels=["model"]), {name: s.get(key, 0) * factor for name, s in stats.items()})
    for key, metric, text in ENGINE_GAUGES:
        yield _by_model(GaugeMetricFamily(metric, text, labels=["model"]), {name: s.get(key, 0) for name, s in stats.items()})
    crashes = CounterMetricFamily("aiosfs_engine_crashes", "Times an engine process died.", labels=["model"])
    yield _by_model(crashes, {name: engine.stats.get("engine_crashes", 0) for name, engine in engines.items()})
    hangs = CounterMetricFamily("aiosfs_engine_hangs", "Times an engine made no progress and was killed.", labels=["model"])
    yield _by_model(hangs, {name: engine.stats.get("engine_hangs", 0) for name, engine in engines.items()})
    slots = GaugeMetricFamily("aiosfs_engine_slots", "Sequences an engine may decode together.", labels=["model"])
    yield _by_model(slots, {name: engine.n_seqs for name, engine in engines.items()})
    state = GaugeMetricFamily(
        "aiosfs_engine_state", "1 for the state an engine is in (loading, ready, hung, restarting, failed).", labels=["model", "state"]
    )
    for name, engine in engines.items():
        state.add_metric([name, engine.client.state], 1)
    yield state


def _by_model(family: CounterMetricFamily | GaugeMetricFamily, values: Mapping[str, float]) -> Metric:
    for name, value in values.items():
        family.add_metric([name], value)
    return family


def _merged(sources: Iterable[tuple[dict[str, str], Iterable[Metric]]]) -> Iterator[Metric]:
    """The metrics of several sources (each engine's histograms) as one family per name,
    each sample with its source's labels added, and without the `_created` samples that
    prometheus_client adds (a restart shows as a counter reset, as everywhere here)."""
    families: dict[str, Metric] = {}
    for labels, metrics in sources:
        for metric in metrics:
            family = families.setdefault(metric.name, Metric(metric.name, metric.documentation, metric.type, metric.unit))
            family.samples += [s._replace(labels={**labels, **s.labels}) for s in metric.samples if not s.name.endswith("_created")]
    yield from families.values()


def metrics_registry(kernel: Kernel) -> CollectorRegistry:
    """A registry of the kernel's metrics and the daemon process's own (CPU, memory,
    open files, as `aiosfs_process_*`); render it with
    `prometheus_client.exposition.generate_latest`, on the trio thread."""
    registry = CollectorRegistry()
    registry.register(KernelCollector(kernel))
    ProcessCollector(namespace="aiosfs", registry=registry)
    return registry
