"""Context switches on the real model: a switched-out and resumed greedy generation
is token-identical to an uninterrupted one, at every level."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from kernel_helpers import OWNER, mkdir, run, running, submit

from aiosfs.model import default_model_path
from kernel.backends.llama import LlamaBackend
from kernel.jobs import JobState
from kernel.kernel import Kernel
from kernel.storage import Storage

pytestmark = pytest.mark.model

STORY = '{"prompt": "Tell me a story about a robot who learns to paint.", "temperature": 0, "max_tokens": 48, "ignore_eos": true}'
OTHER = '{"prompt": "List some fruits.", "temperature": 0, "max_tokens": 48, "ignore_eos": true}'


@pytest.fixture(scope="module")
def backend() -> Iterator[LlamaBackend]:
    path = default_model_path()
    if not path.is_file():
        pytest.fail(f"the embedded model is not installed at {path}: run scripts/setup")
    llama = LlamaBackend(path, threads=2, n_slots=2, n_ctx_seq=512, n_batch=128)
    yield llama
    llama.close()


def generate(
    backend: LlamaBackend, db: Path, scheduler: str, *, other: str = "", other_after: int = 0, pause_after: int = 0, **options: object
) -> tuple[str, dict]:
    """The story's text when generated under the given policy, and the engine's stats."""
    kernel = Kernel(Storage(db), backend, scheduler, **options)

    async def body() -> str:
        async with running(kernel):
            story_agent = await mkdir(kernel, "story")
            other_agent = await mkdir(kernel, "other")
            story = await submit(kernel, story_agent, STORY)
            while len(story.data) < other_after:
                await story.wait_beyond(len(story.data), 1.0)
            other_job = await submit(kernel, other_agent, other) if other else None
            if pause_after:
                while len(story.data) < pause_after:
                    await story.wait_beyond(len(story.data), 1.0)
                await kernel_ctl(kernel, story_agent, "pause")
                await trio.sleep(0.3)
                paused_at = len(story.data)
                await trio.sleep(0.3)
                assert len(story.data) == paused_at and story.shown_state == "suspended"
                await kernel_ctl(kernel, story_agent, "resume")
            for job in (story, other_job):
                while job is not None and not job.state.finished:
                    await job.wait_beyond(len(job.data), 1.0)
            assert story.state is JobState.DONE
            return story.text

    try:
        return run(body, timeout=300), kernel.engine.statistics()
    finally:
        kernel.storage.close()


async def kernel_ctl(kernel: Kernel, agent: object, line: str) -> None:
    from kernel.syscall import Sys, syscall

    await syscall(kernel, Sys.AGENT_CTL, OWNER, agent, line)


@pytest.fixture(scope="module")
def reference(backend: LlamaBackend, tmp_path_factory: pytest.TempPathFactory) -> str:
    text, stats = generate(backend, tmp_path_factory.mktemp("ref") / "db", "fifo")
    assert stats["preemptions"] == 0
    return text


def test_swap_out_and_in_is_token_identical(backend: LlamaBackend, reference: str, tmp_path: Path) -> None:
    text, stats = generate(backend, tmp_path / "db", "rr quantum=4", other=OTHER, slots=1)
    assert stats["swaps_out"] > 0 and stats["swaps_in"] > 0 and stats["recomputes"] == 0
    assert text == reference


def test_recompute_past_the_ram_budget_is_token_identical(backend: LlamaBackend, reference: str, tmp_path: Path) -> None:
    text, stats = generate(backend, tmp_path / "db", "rr quantum=4", other=OTHER, slots=1, swap_budget=0)
    assert stats["recomputes"] > 0 and stats["swaps_out"] == 0
    assert text == reference


def test_pause_and_resume_is_token_identical(backend: LlamaBackend, reference: str, tmp_path: Path) -> None:
    text, _ = generate(backend, tmp_path / "db", "fifo", pause_after=20)
    assert text == reference


def test_priority_preemption_is_token_identical(backend: LlamaBackend, reference: str, tmp_path: Path) -> None:
    urgent = OTHER.replace('"temperature"', '"priority": 5, "temperature"')
    text, stats = generate(backend, tmp_path / "db", "priority", other=urgent, other_after=20, slots=1)
    assert stats["preemptions"] == 1
    assert text == reference
