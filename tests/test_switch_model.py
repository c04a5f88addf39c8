"""Context switches on the real model: a switched-out and resumed greedy generation
is token-identical to an uninterrupted one, at every level."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kernel_helpers import OWNER, finished, mkdir, producing, run, running, submit

from kernel.cores.backends.llama import LlamaBackend
from kernel.kernel import Kernel
from kernel.llm.jobs import JobState
from kernel.storage.database import Storage
from setup.model import shipped_model_path

pytestmark = pytest.mark.model

STORY = '{"prompt": "Tell me a story about a robot who learns to paint.", "temperature": 0, "max_tokens": 48, "ignore_eos": true}'
OTHER = '{"prompt": "List some fruits.", "temperature": 0, "max_tokens": 48, "ignore_eos": true}'


@pytest.fixture(scope="module")
def backend() -> Iterator[LlamaBackend]:
    path = shipped_model_path()  # the shipped weights on every machine (see conftest.model)
    if not path.is_file():
        pytest.fail(f"the embedded model is not installed at {path}: run scripts/setup")
    llama = LlamaBackend(path, threads=2, n_slots=2, n_ctx_seq=512, n_batch=128)
    yield llama
    llama.close()


def generate(
    backend: LlamaBackend,
    db: Path,
    scheduler: str,
    *,
    story: str = STORY,
    other: str = "",
    other_after: int = 0,
    pause_after: int = 0,
    **options: object,
) -> tuple[dict[str, str], dict]:
    """The texts of the story (and of the other job) when generated under the given policy,
    and the engine's stats. With `pause_after`, the story is paused after that many bytes
    while the other job runs from start to end, then resumed."""
    kernel = Kernel(Storage(db), backend, scheduler, **options)

    async def body() -> dict[str, str]:
        async with running(kernel):
            story_agent = await mkdir(kernel, "story")
            other_agent = await mkdir(kernel, "other")
            story_job = await submit(kernel, story_agent, story)
            other_job = None
            if pause_after:
                while len(story_job.data) < pause_after:
                    await story_job.wait_beyond(len(story_job.data), 1.0)
                await kernel_ctl(kernel, story_agent, "pause")
                # Every step of the other job starts after the pause: once its first bytes are
                # here, so are all of the story's from the steps before, and it must not grow.
                other_job = await producing(await submit(kernel, other_agent, other))
                paused_at = len(story_job.data)
                await finished(other_job)
                assert len(story_job.data) == paused_at and story_job.shown_state == "suspended"
                await kernel_ctl(kernel, story_agent, "resume")
            elif other:
                while len(story_job.data) < other_after:
                    await story_job.wait_beyond(len(story_job.data), 1.0)
                other_job = await submit(kernel, other_agent, other)
            texts = {}
            for name, job in (("story", story_job), ("other", other_job)):
                if job is not None:
                    await finished(job)
                    assert job.state is JobState.DONE, (name, job.state, job.message)
                    texts[name] = job.text
            return texts

    try:
        return run(body, timeout=300), kernel.engine.statistics()
    finally:
        kernel.storage.close()


async def kernel_ctl(kernel: Kernel, agent: object, line: str) -> None:
    from kernel.syscall import Sys, syscall

    await syscall(kernel, Sys.AGENT_CTL, OWNER, agent, line)


@pytest.fixture(scope="module")
def reference(backend: LlamaBackend, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each job's text from an uninterrupted greedy run, alone in the engine."""
    texts = {}
    for name, request in (("story", STORY), ("other", OTHER)):
        generated, stats = generate(backend, tmp_path_factory.mktemp("ref") / "db", "fifo", story=request)
        assert stats["preemptions"] == 0 and stats["swaps_out"] == 0 and stats["recomputes"] == 0
        texts[name] = generated["story"]
    assert texts["story"] != texts["other"] and all(len(text) > 48 for text in texts.values())  # 48 tokens each
    return texts


def test_swap_out_and_in_is_token_identical(backend: LlamaBackend, reference: dict[str, str], tmp_path: Path) -> None:
    texts, stats = generate(backend, tmp_path / "db", "rr quantum=4", other=OTHER, slots=1)
    assert stats["swaps_out"] > 0 and stats["swaps_in"] > 0 and stats["recomputes"] == 0
    assert texts == reference  # both were switched out, again and again


def test_recompute_past_the_ram_budget_is_token_identical(backend: LlamaBackend, reference: dict[str, str], tmp_path: Path) -> None:
    texts, stats = generate(backend, tmp_path / "db", "rr quantum=4", other=OTHER, slots=1, swap_budget=0)
    assert stats["recomputes"] > 0 and stats["swaps_out"] == 0
    assert texts == reference


def test_pause_and_resume_is_token_identical(backend: LlamaBackend, reference: dict[str, str], tmp_path: Path) -> None:
    texts, _ = generate(backend, tmp_path / "db", "fifo", other=OTHER, pause_after=20)
    assert texts == reference


def test_priority_preemption_is_token_identical(backend: LlamaBackend, reference: dict[str, str], tmp_path: Path) -> None:
    urgent = OTHER.replace('"temperature"', '"priority": 5, "temperature"')
    texts, stats = generate(backend, tmp_path / "db", "priority", other=urgent, other_after=20, slots=1)
    assert stats["preemptions"] == 1
    assert texts == reference
