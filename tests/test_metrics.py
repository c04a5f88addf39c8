"""kernel/metrics and `mount --metrics`: the Prometheus text format, read back with
prometheus_client's own parser, in-process and through a real mount and its HTTP
server."""

from __future__ import annotations

import os
import socket
import stat
import urllib.request
from pathlib import Path

import pytest
import trio
from kernel_helpers import OTHER, ask, ctl, finished, mkdir, remember, run, running, submit
from mounting import aiosfs, mounted, needs_fuse, sh
from prometheus_client import REGISTRY
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from aiosfs.cli import build_parser
from aiosfs.metrics import MetricsServer
from kernel.cores.backends.fake import FakeBackend
from kernel.kernel import Kernel
from kernel.llm.jobs import JobState
from kernel.metrics import metrics_registry
from kernel.storage.database import Storage

HISTOGRAMS = ["aiosfs_engine_step_seconds", "aiosfs_engine_host_seconds", "aiosfs_engine_batch_sequences", "aiosfs_engine_batch_tokens"]


def families(text: str) -> dict[str, Metric]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(found: dict[str, Metric], sample: str, **labels: str) -> float:
    """The one sample named `sample` whose labels include `labels`; 0 when there is none
    (a labelled counter appears at its first increment)."""
    family = found[sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum")]
    matches = [s.value for s in family.samples if s.name == sample and labels.items() <= s.labels.items()]
    assert len(matches) <= 1, f"{sample} {labels}: {matches}"
    return matches[0] if matches else 0.0


def test_the_text_parses_and_counts_steps_and_jobs(tmp_path: Path) -> None:
    kernel = Kernel(Storage(tmp_path / "aiosfs.db"), FakeBackend(n_slots=1, step_delay=0.01))
    registry = metrics_registry(kernel)

    async def body() -> None:
        async with running(kernel):
            alice, bob = await mkdir(kernel, "alice"), await mkdir(kernel, "bob", OTHER)
            done = [await ask(kernel, alice, "hello"), await ask(kernel, alice, "again"), await ask(kernel, bob, "hi bob", OTHER)]
            long = await submit(kernel, alice, "a longer question that keeps the only slot busy")
            queued = await submit(kernel, bob, "waits in the queue", OTHER)
            mid = families(generate_latest(registry).decode())
            assert value(mid, "aiosfs_queued_jobs", model="fake") + value(mid, "aiosfs_running_jobs", model="fake") >= 1
            await ctl(kernel, bob, f"cancel {queued.id}", OTHER)
            await finished(long)
            assert queued.state is JobState.CANCELLED and not queued.n_generated
            await remember(kernel, alice, "notes.md", "twelve bytes")
            ended = [*done, long, queued]
            text = generate_latest(registry).decode()
            stats = kernel.statistics()
            found = families(text)

            assert value(found, "aiosfs_jobs_finished_total", model="fake", state="done") == 4
            assert value(found, "aiosfs_jobs_finished_total", model="fake", state="cancelled") == 1
            assert value(found, "aiosfs_job_ttft_seconds_count", model="fake") == 4  # the jobs that produced a token
            assert 0 < value(found, "aiosfs_job_ttft_seconds_sum", model="fake") <= value(found, "aiosfs_job_duration_seconds_sum", model="fake")
            assert value(found, "aiosfs_job_generated_tokens_count", model="fake") == 5
            assert value(found, "aiosfs_job_generated_tokens_sum", model="fake") == sum(job.n_generated for job in ended) == stats["generated"]
            assert value(found, "aiosfs_generated_tokens_total", model="fake") == stats["generated"]

            steps = value(found, "aiosfs_engine_step_seconds_count", model="fake")
            assert steps > 0 and all(value(found, f"{name}_count", model="fake") == steps for name in HISTOGRAMS)
            assert value(found, "aiosfs_engine_batch_tokens_sum", model="fake") == stats["batch_tokens"]
            assert value(found, "aiosfs_engine_batch_sequences_sum", model="fake") == stats["batch_seqs"]
            assert value(found, "aiosfs_engine_host_seconds_sum", model="fake") < value(found, "aiosfs_engine_step_seconds_sum", model="fake")
            assert value(found, "aiosfs_engine_step_seconds_sum", model="fake") <= kernel.engine.stats["step_s"]
            # a step's histogram: cumulative buckets that end in +Inf == count
            buckets = [s for s in found["aiosfs_engine_step_seconds"].samples if s.name.endswith("_bucket")]
            assert (
                [s.value for s in buckets] == sorted(s.value for s in buckets) and buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == steps
            )

            assert value(found, "aiosfs_queued_jobs", model="fake") == value(found, "aiosfs_running_jobs", model="fake") == 0
            assert value(found, "aiosfs_engine_state", model="fake", state="ready") == 1
            assert value(found, "aiosfs_engine_crashes_total", model="fake") == value(found, "aiosfs_engine_hangs_total", model="fake") == 0
            assert value(found, "aiosfs_agents") == 2
            assert value(found, "aiosfs_memory_bytes", agent="alice") == len("twelve bytes")
            assert value(found, "aiosfs_memory_bytes", agent="bob") == 0
            assert value(found, "aiosfs_kv_prefix_reused_tokens_total", model="fake") == stats["prefix_hit_tokens"] > 0
            assert "aiosfs_process_cpu_seconds" in found
            assert not any(sample.name.endswith("_created") for family in found.values() for sample in family.samples)

    run(body)
    kernel.storage.close()


def test_each_kernel_has_its_own_registry(tmp_path: Path) -> None:
    """Several kernels in one process: nothing goes to prometheus_client's global registry."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = Kernel(Storage(tmp_path / "a" / "aiosfs.db"), FakeBackend())
    second = Kernel(Storage(tmp_path / "b" / "aiosfs.db"), FakeBackend())

    async def body() -> None:
        async with running(first), running(second):
            await ask(first, await mkdir(first, "alice"), "hello")
            one, two = (families(generate_latest(metrics_registry(k)).decode()) for k in (first, second))
            assert value(one, "aiosfs_jobs_finished_total", state="done") == 1
            assert value(two, "aiosfs_jobs_finished_total", state="done") == 0
            assert value(two, "aiosfs_engine_step_seconds_count", model="fake") == 0

    run(body)
    assert not any(metric.name.startswith("aiosfs") for metric in REGISTRY.collect())
    first.storage.close()
    second.storage.close()


@pytest.mark.parametrize("address", ["9464", "localhost", "127.0.0.1:", ":9464", "127.0.0.1:http", "127.0.0.1:0", "127.0.0.1:65536"])
def test_a_bad_metrics_address_is_a_usage_error(address: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["mount", "/tmp/x", "--metrics", address])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "argument --metrics" in err and "is not HOST:PORT" in err, err


def test_good_metrics_addresses_parse() -> None:
    for address in ["127.0.0.1:9464", "[::1]:9464", "0.0.0.0:1", "localhost:65535"]:
        assert build_parser().parse_args(["mount", "/tmp/x", "--metrics", address]).metrics == address


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        assert reply.status == 200
        return reply.read().decode()


@needs_fuse
@pytest.mark.mount
def test_a_mount_serves_the_file_and_http(tmp_path: Path) -> None:
    port = free_port()
    with mounted(tmp_path, "--backend", "fake", "--metrics", f"127.0.0.1:{port}") as mount:
        path = mount.root / "kernel" / "metrics"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o444
        before_file, before_http = families(path.read_text()), families(scrape(port))
        assert set(before_file) == set(before_http)
        assert value(before_http, "aiosfs_jobs_finished_total", model="fake", state="done") == 0
        agent = mount.agent("m")
        answered = sh(f"echo hello > {agent}/prompt && cat {agent}/output", timeout=60)
        assert answered.returncode == 0 and answered.stdout == "turn 1: HELLO\n", answered
        after_http, after_file = families(scrape(port)), families(path.read_text())
        for found in (after_http, after_file):
            assert value(found, "aiosfs_jobs_finished_total", model="fake", state="done") == 1
            assert value(found, "aiosfs_job_ttft_seconds_count", model="fake") == 1
            assert value(found, "aiosfs_job_generated_tokens_sum", model="fake") == len("turn 1: HELLO")
            assert value(found, "aiosfs_engine_step_seconds_count", model="fake") > 0
            assert value(found, "aiosfs_generated_tokens_total", model="fake") > value(before_file, "aiosfs_generated_tokens_total", model="fake")
        assert set(after_http) == set(after_file)
        held = socket.socket()  # the port is the mount's: a second server cannot have it
        with pytest.raises(OSError), held:
            held.bind(("127.0.0.1", port))
    with pytest.raises(OSError):  # the unmount closed the server
        scrape(port)


@needs_fuse
@pytest.mark.mount
def test_a_port_in_use_stops_the_mount_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        root = tmp_path / "mnt"
        result = aiosfs("mount", str(root), "--state", str(tmp_path / "state"), "--backend", "fake", "--metrics", f"127.0.0.1:{port}", timeout=60)
    assert result.returncode == 1, result
    assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in result.stderr, result.stderr
    assert not os.path.ismount(root)


def test_http_scrapes_are_rendered_on_the_trio_thread(tmp_path: Path) -> None:
    """The server's threads hand each scrape to the trio loop; before it runs and after it
    ends, a scrape is an empty page, not an error."""
    kernel = Kernel(Storage(tmp_path / "aiosfs.db"), FakeBackend())
    port = free_port()
    server = MetricsServer(metrics_registry(kernel), f"127.0.0.1:{port}")
    try:
        assert scrape(port) == ""

        async def body() -> None:
            async with running(kernel):
                server.token = trio.lowlevel.current_trio_token()
                await ask(kernel, await mkdir(kernel, "alice"), "hello")
                found = families(await trio.to_thread.run_sync(scrape, port))
                assert value(found, "aiosfs_jobs_finished_total", model="fake", state="done") == 1

        run(body)
        assert scrape(port) == ""
    finally:
        server.close()
        kernel.storage.close()
