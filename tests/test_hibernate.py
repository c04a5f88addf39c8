"""Hibernation: agents' KV sequences on disk (kernel/cores/hibernate.py, kernel/cores/kvkey.py,
docs/engine.md). The store on its own, the runner on the fake model, engine processes
that are closed (an unmount) or killed (a crash) and started again, and real mounts:
on the fake model, and on the embedded one for token identity."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kernel_helpers import OWNER, answer, ask, mkdir, run, running
from mounting import mounted, needs_fuse, sh, wait_for

from kernel import params
from kernel.agents.config import AgentConfig
from kernel.cores import kvkey
from kernel.cores.backends import BackendInfo
from kernel.cores.backends.fake import FakeBackend
from kernel.cores.enginehost import EngineProcess
from kernel.cores.hibernate import PREFIX, KvStore, file_name
from kernel.cores.runner import Runner
from kernel.cores.wire import Admit, EngineSpec, Plan
from kernel.kernel import Kernel
from kernel.storage.database import Storage
from kernel.syscall import Sys, syscall

SYSTEM = "You keep the ledgers of a small bakery and answer in one line. " * 6  # ~380 tokens on the fake (bytes)
TOKENS = list(range(300))


def _store(directory: Path, key: str = "k", budget: int = 1 << 30) -> KvStore:
    store = KvStore(directory, key, budget)
    store.open()
    return store


def _files(directory: Path, suffix: str = ".kv") -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(suffix))


# -- the store ------------------------------------------------------------------------------------


def test_a_state_written_is_read_back_by_the_next_engine_and_checked(tmp_path: Path) -> None:
    store = _store(tmp_path)
    assert store.put("1000", "a", TOKENS, 256, b"cells of a" * 100)
    assert store.flush(5)
    assert _files(tmp_path) == [file_name("1000", "a")] and store.holds("1000", "a", TOKENS)
    store.close(1)
    again = _store(tmp_path)  # a new engine: the index from the headers
    entry = again.find("1000", "a")
    assert entry is not None and entry.tokens == TOKENS and entry.tiled == 256
    assert again.find("1001", "a") is None and again.find("1000", "b") is None  # keyed by scope and agent
    assert again.load(entry) == b"cells of a" * 100
    assert again.statistics() == {"kv_hibernated": 0, "kv_disk_discarded": 0, "kv_disk_bytes": entry.size}
    again.close(1)


def test_files_of_another_key_are_discarded_never_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = _store(tmp_path, key="model-a")
    store.put("1000", "a", TOKENS, 0, b"x" * 64)
    store.close(5)
    with caplog.at_level(logging.INFO, logger="kernel.cores.hibernate"):
        other = _store(tmp_path, key="model-b")
    assert other.find("1000", "a") is None and _files(tmp_path) == []
    assert other.statistics()["kv_disk_discarded"] == 1
    assert "made by another model" in caplog.text
    other.close(1)


def test_the_key_changes_with_the_context_tiles_model_and_build(tmp_path: Path) -> None:
    info = BackendInfo("m", "llama.cpp", "-", "cpu", 2, 0, 4, 2048, 512)
    fake = kvkey.engine_key("fake", "", info, tmp_path)
    assert kvkey.engine_key("fake", "", info, tmp_path) == fake
    assert kvkey.engine_key("fake", "", BackendInfo("m", "fake", "-", "cpu", 2, 0, 4, 1024, 512), tmp_path) != fake  # n_ctx_seq
    assert kvkey.engine_key("fake", "", BackendInfo("m", "fake", "-", "cpu", 2, 0, 4, 2048, 32), tmp_path) != fake  # no tiles
    model = tmp_path / "model.gguf"
    model.write_bytes(b"weights" * 1000)
    llama = kvkey.engine_key("llama", str(model), info, tmp_path)
    assert llama != fake
    model.write_bytes(b"weights" * 999 + b"changed")
    assert kvkey.engine_key("llama", str(model), info, tmp_path) != llama  # another model file
    assert kvkey.engine_key("llama", str(model), BackendInfo("m", "llama.cpp", "-", "gpu", 2, 31, 4, 2048, 512), tmp_path) != llama


def test_a_files_digest_is_computed_once_per_path_size_and_mtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"w" * 100_000)
    hashed: list[Path] = []
    real = kvkey.Digests._hash
    monkeypatch.setattr(kvkey.Digests, "_hash", lambda self, file: hashed.append(file) or real(self, file))
    for _ in range(2):  # two engine starts
        digests = kvkey.Digests(tmp_path / kvkey.DIGESTS, lambda: None)
        first = digests.of(model)
        digests.save()
    assert hashed == [model]
    os.utime(model, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: hashed again
    assert kvkey.Digests(tmp_path / kvkey.DIGESTS, lambda: None).of(model) == first and hashed == [model, model]


@pytest.mark.parametrize("damage", ["payload", "header", "truncate"])
def test_a_corrupt_or_truncated_file_is_discarded_with_a_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str) -> None:
    store = _store(tmp_path)
    store.put("1000", "a", TOKENS, 0, bytes(range(256)) * 8)
    store.close(5)
    path = tmp_path / file_name("1000", "a")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(data[:-100])
    else:
        data[-5 if damage == "payload" else PREFIX.size + 3] ^= 0xFF
        path.write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="kernel.cores.hibernate"):
        again = _store(tmp_path)
        entry = again.find("1000", "a")
        if damage == "payload":  # the header is whole: found at start, refused at the read
            assert entry is not None and again.load(entry) is None
        else:
            assert entry is None
    assert re.search(r"discarding the KV file .*(checksum|truncated)", caplog.text), caplog.text
    assert not path.exists() and again.find("1000", "a") is None
    assert again.statistics()["kv_disk_discarded"] == 1
    again.close(1)


def test_the_disk_budget_evicts_the_least_recently_used_files(tmp_path: Path) -> None:
    state = b"s" * 4000
    store = _store(tmp_path, budget=3 * 5500)  # room for three files of about 5.5 KB (prefix, header with the tokens, state)
    for agent in "abc":
        store.put("1000", agent, TOKENS, 0, state)
        store.flush(5)
        time.sleep(0.01)
    a = store.find("1000", "a")
    assert a is not None and store.load(a) == state  # a restore is a use: b is now the oldest
    store.put("1000", "d", TOKENS, 0, state)
    store.flush(5)
    assert sorted(e.agent for e in store.of_scope("1000")) == ["a", "c", "d"]
    assert _files(tmp_path) == sorted(file_name("1000", x) for x in "acd")
    assert store.statistics()["kv_disk_bytes"] <= 3 * 5500
    store.close(1)
    again = _store(tmp_path, budget=2 * 5500)  # a smaller budget at the next start: the oldest by mtime go
    assert sorted(e.agent for e in again.of_scope("1000")) == ["a", "d"]
    again.close(1)


def test_a_write_is_atomic_no_partial_file_is_ever_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(tmp_path)
    (tmp_path / f"{file_name('1000', 'x')}.123.tmp").write_bytes(b"left by a writer that died")
    assert _files(tmp_path, ".tmp") == [f"{file_name('1000', 'x')}.123.tmp"]  # opened before: still there
    store.close(1)
    store = _store(tmp_path)
    assert _files(tmp_path, ".tmp") == []  # removed at start, never indexed
    entered, go = threading.Event(), threading.Event()
    real = os.replace

    def slow_replace(source: Path, target: Path) -> None:  # the bytes are written, the rename not yet done
        entered.set()
        go.wait(5)
        real(source, target)

    monkeypatch.setattr(os, "replace", slow_replace)
    store.put("1000", "a", TOKENS, 0, b"z" * 50_000)
    assert entered.wait(5)
    # mid-write: the bytes are in a temporary file only; the agent's file does not exist yet
    assert _files(tmp_path) == [] and len(_files(tmp_path, ".tmp")) == 1
    assert store.find("1000", "a") is None and not store.holds("1000", "a", [1])
    go.set()
    assert store.flush(5)
    monkeypatch.setattr(os, "replace", real)
    assert _files(tmp_path) == [file_name("1000", "a")] and _files(tmp_path, ".tmp") == []
    entry = store.find("1000", "a")
    assert entry is not None and store.load(entry) == b"z" * 50_000
    store.close(1)


# -- the runner, on the fake model ------------------------------------------------------------------


def _admit(key: int, agent: str, text: str, scope: str = "1000") -> Admit:
    return Admit(key, agent, list(text.encode()), AgentConfig(max_tokens=32, temperature=0), 0, None, scope)


def _finish(runner: Runner, plan: Plan, steps: int = 300) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for _ in range(steps):
        for key, chunk, _n, _end in runner.step(plan).outputs:
            out[key] = out.get(key, b"") + chunk
        plan = Plan()
        if not runner.placement.slots:
            return out
    raise AssertionError("jobs did not end")


def _prompt(question: str) -> str:
    return f"<|system|>\n{SYSTEM}<|end|>\n<|user|>\n{question}<|end|>\n<|assistant|>\n"


def _hibernated(tmp_path: Path, turns: list[tuple[str, str]]) -> KvStore:
    """Run each (agent, question) on an engine with a store, write what it finished, close it."""
    store = _store(tmp_path)
    runner = Runner(FakeBackend(n_slots=2), store=store)
    for key, (agent, question) in enumerate(turns, 1):
        _finish(runner, Plan(start=[_admit(key, agent, _prompt(question))]))
        while runner.hibernate(idle=True):
            pass
    store.flush(5)
    runner.close()
    store.close(1)
    return _store(tmp_path)


def test_an_agents_next_turn_restores_its_sequence_instead_of_prefilling(tmp_path: Path) -> None:
    store = _hibernated(tmp_path, [("a", "first")])
    runner = Runner(FakeBackend(n_slots=2), store=store)
    second = _prompt("first") + "turn 1: FIRST<|end|>\n<|user|>\nsecond<|end|>\n<|assistant|>\n"
    out = _finish(runner, Plan(start=[_admit(1, "a", second)]))
    assert out[1].decode() == answer("second", 2)
    restored = runner.stats["kv_restore_tokens"]
    assert runner.stats["kv_restores"] == 1 and restored >= len(_prompt("first")) - 1
    assert runner.stats["prompt_tokens"] == len(second) - restored  # only what the file did not hold was prefilled
    cold = Runner(FakeBackend(n_slots=2))  # the same turn on an engine without the files
    assert _finish(cold, Plan(start=[_admit(1, "a", second)]))[1] == out[1]
    assert cold.stats["kv_restores"] == 0 and cold.stats["prompt_tokens"] == len(second)
    store.close(1)


def test_a_corrupt_file_costs_a_prefill_not_the_answer(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _hibernated(tmp_path, [("a", "first")]).close(1)
    path = tmp_path / file_name("1000", "a")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x55
    path.write_bytes(data)
    store = _store(tmp_path)
    runner = Runner(FakeBackend(n_slots=2), store=store)
    with caplog.at_level(logging.WARNING, logger="kernel.cores.hibernate"):
        out = _finish(runner, Plan(start=[_admit(1, "a", _prompt("first") + "more")]))
    assert out[1].decode() == answer("first")  # the fake reads the last complete user message
    assert runner.stats["kv_restores"] == 0 and runner.stats["prompt_tokens"] == len(_prompt("first") + "more")
    assert "discarding the KV file" in caplog.text and not path.exists()
    store.close(1)


def test_another_agent_of_the_scope_restores_the_shared_prefix_in_whole_tiles(tmp_path: Path) -> None:
    store = _hibernated(tmp_path, [("a", "a question")])
    runner = Runner(FakeBackend(n_slots=2), store=store)
    shared = len(f"<|system|>\n{SYSTEM}<|end|>\n<|user|>\n") // params.PREFILL_TILE * params.PREFILL_TILE  # a's and b's prompts part there
    out = _finish(runner, Plan(start=[_admit(1, "b", _prompt("b question")), _admit(2, "c", _prompt("c question"), scope="1001")]))
    assert out[1].decode() == answer("b question") and out[2].decode() == answer("c question")
    assert runner.stats["kv_restores"] == 1  # b, of a's scope; never c, another user's
    assert runner.stats["kv_restore_tokens"] == runner.stats["shared_prefix_tokens"] == shared
    store.close(1)


def test_a_busy_engine_writes_a_finished_sequence_after_the_delay_an_idle_one_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(tmp_path)
    runner = Runner(FakeBackend(n_slots=2), store=store)
    _finish(runner, Plan(start=[_admit(1, "a", _prompt("q"))]))
    assert not runner.hibernate(idle=False)  # just ended, the engine busy: later
    monkeypatch.setattr(params, "KV_WRITE_DELAY_SECONDS", 0.0)
    assert runner.hibernate(idle=False) and not runner.hibernate(idle=True)  # written once, then nothing left
    _finish(runner, Plan(start=[_admit(2, "b", _prompt("r"))]))
    assert runner.hibernate(idle=True)
    store.flush(5)
    assert sorted(e.agent for e in store.of_scope("1000")) == ["a", "b"]
    runner.close()
    store.close(1)


def test_a_sequence_taken_at_once_by_its_agents_next_job_is_written_when_it_grew_enough(tmp_path: Path) -> None:
    """An agent that asks again as soon as it has its answer never leaves its engine idle:
    its sequence goes to disk when the next job takes it, once it grew by KV_WRITE_MIN_GROWTH."""
    store = _store(tmp_path)
    runner = Runner(FakeBackend(n_slots=2), store=store)
    _finish(runner, Plan(start=[_admit(1, "a", _prompt("first"))]))
    second = _prompt("first") + "turn 1: FIRST<|end|>\n<|user|>\nsecond<|end|>\n<|assistant|>\n"
    _finish(runner, Plan(start=[_admit(2, "a", second)]))  # no idle moment between the two
    store.flush(5)
    entry = store.find("1000", "a")
    assert entry is not None and entry.tokens == list(_prompt("first").encode()) + list(b"turn 1: FIRST")
    third = second + "turn 2: SECOND<|end|>\n<|user|>\nthird<|end|>\n<|assistant|>\n"
    _finish(runner, Plan(start=[_admit(3, "a", third)]))  # it grew by a few tokens since: not written again
    store.flush(5)
    assert store.find("1000", "a") is entry and len(second) - len(entry.tokens) < params.KV_WRITE_MIN_GROWTH
    runner.close()
    store.close(1)


def test_an_evicted_sequence_that_ram_cannot_hold_goes_to_disk(tmp_path: Path) -> None:
    from kernel.cores.wire import RunnerOptions

    store = _store(tmp_path)
    runner = Runner(FakeBackend(n_slots=1), RunnerOptions(swap_budget=0), store)  # no RAM for saved states
    _finish(runner, Plan(start=[_admit(1, "a", _prompt("first"))]))
    _finish(runner, Plan(start=[_admit(2, "b", "<|user|>\nsomething else<|end|>\n")]))  # evicts a's sequence: dropped from RAM
    assert runner.stats["cache_evictions"] == 1 and runner.placement.cached_sequences == 1
    store.flush(5)
    second = _prompt("first") + "turn 1: FIRST<|end|>\n<|user|>\nsecond<|end|>\n<|assistant|>\n"
    out = _finish(runner, Plan(start=[_admit(3, "a", second)]))
    assert out[3].decode() == answer("second", 2) and runner.stats["kv_restores"] == 1
    runner.close()
    store.close(1)


def test_at_close_cached_sequences_and_running_jobs_cells_go_to_disk(tmp_path: Path) -> None:
    store = _store(tmp_path)
    runner = Runner(FakeBackend(n_slots=2), store=store)
    _finish(runner, Plan(start=[_admit(1, "a", _prompt("done"))]))  # never idle since: not written yet
    runner.step(Plan(start=[_admit(2, "b", _prompt("running"))]))  # one step into its prefill
    running_cells = list(runner.placement.keys[2].kv)
    assert running_cells and store.of_scope("1000") == []
    runner.close()
    store.flush(5)
    written = {e.agent: e.tokens for e in store.of_scope("1000")}
    assert written == {"a": list(_prompt("done").encode()) + list(b"turn 1: DONE"), "b": running_cells}
    store.close(1)


# -- engine processes: an unmount, a crash --------------------------------------------------------


def _engine(tmp_path: Path, kv_disk: int = 1 << 30) -> tuple[Kernel, EngineProcess]:
    core = EngineProcess(EngineSpec("fake", n_slots=2, n_ctx_seq=2048, kv_dir=str(tmp_path / "kv"), kv_disk=kv_disk))
    core.start()
    return Kernel(Storage(tmp_path / "aiosfs.db"), core), core


def _turns(kernel: Kernel, first: bool, questions: list[str], between: Callable[[], None] = lambda: None) -> tuple[list[str], dict[str, Any]]:
    """Ask agent `a` (made first when `first`) each question in turn, calling `between`
    after each; the answers, and the engine's counters since the last `between`."""

    async def body() -> tuple[list[str], dict[str, Any]]:
        async with running(kernel):
            if first:
                agent = await mkdir(kernel, "a")
                await syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, f"system={SYSTEM}\nmax_tokens=32\n")
            answers, before = [], kernel.engine.statistics()
            for question in questions:
                answers.append((await ask(kernel, kernel.agents["a"], question)).answer)
                after = kernel.engine.statistics()
                if question is not questions[-1]:
                    between()
                    before = kernel.engine.statistics()
            return answers, {key: after[key] - before[key] for key in after if isinstance(after[key], int | float)}

    return run(body, timeout=60)


def _close(kernel: Kernel, core: EngineProcess) -> None:
    core.close()
    kernel.close()
    kernel.memory.store.close()


@pytest.mark.parametrize("kv_disk", [1 << 30, 0])
def test_a_turn_after_the_engine_was_closed_and_started_again_restores(tmp_path: Path, kv_disk: int) -> None:
    kernel, core = _engine(tmp_path, kv_disk)
    assert _turns(kernel, True, ["hello"])[0] == [answer("hello")]
    _close(kernel, core)  # an unmount: the engine writes what is not on disk yet before it exits
    kernel, core = _engine(tmp_path, kv_disk)
    texts, stats = _turns(kernel, False, ["again"])
    _close(kernel, core)
    assert texts == [answer("again", 2)]
    prompt = stats["prompt_tokens"] + stats["kv_restore_tokens"]
    if kv_disk:
        assert stats["kv_restores"] == 1 and stats["kv_restore_tokens"] > len(SYSTEM) and stats["prompt_tokens"] < 64
    else:  # off: the whole conversation is prefilled again, and nothing is written
        assert stats["kv_restores"] == 0 and stats["prompt_tokens"] == prompt > len(SYSTEM)
        assert not (tmp_path / "kv").exists()


def test_after_a_crash_the_next_turn_restores_rather_than_prefills(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(params, "ENGINE_BACKOFF_SECONDS", 0.05)
    kernel, core = _engine(tmp_path)
    crashed: list[int] = []

    def crash() -> None:  # the turn's sequence reaches the disk while the engine is idle; then SIGSEGV
        wait_for(lambda: list((tmp_path / "kv").glob("*.kv")), timeout=10, what="the sequence on disk")
        assert core.pid is not None
        crashed.append(core.pid)
        os.kill(core.pid, signal.SIGSEGV)
        # the next turn waits for the new engine: a job sent to the dying one would fail with it
        wait_for(lambda: kernel.engine.restarts == 1 and core.state == "ready", timeout=30, what="the engine's restart")

    texts, stats = _turns(kernel, True, ["hello", "after the crash"], crash)
    _close(kernel, core)
    assert texts == [answer("hello"), answer("after the crash", 2)]
    assert kernel.engine.restarts == 1 and core.pid != crashed[0]
    assert stats["kv_restores"] == 1 and stats["kv_restore_tokens"] > len(SYSTEM) and stats["prompt_tokens"] < 64


# -- real mounts ------------------------------------------------------------------------------------


def _stats(root: Path) -> dict[str, float]:
    lines = (line.partition(" ") for line in (root / "kernel" / "stats").read_text().splitlines())
    return {key: float(value) for key, _, value in lines if re.fullmatch(r"-?[\d.]+", value)}


def _say(agent: Path, text: str) -> str:
    out = sh(f"echo {json.dumps(text)} > {agent}/prompt && cat {agent}/output", timeout=300)
    assert out.returncode == 0, out
    return out.stdout


@needs_fuse
@pytest.mark.mount
@pytest.mark.parametrize("kv_disk", [None, "0"])
def test_a_remount_restores_each_agents_sequence_and_kv_disk_0_turns_it_off(tmp_path: Path, kv_disk: str | None) -> None:
    args = ["--backend", "fake", *(["--kv-disk", kv_disk] if kv_disk else [])]
    with mounted(tmp_path, *args) as mount:
        agent = mount.agent("a")
        (agent / "config").write_text(f"system={SYSTEM}\nmax_tokens=32\n")
        assert _say(agent, "hello") == answer("hello") + "\n"
    with mounted(tmp_path, *args) as mount:
        assert _say(mount.agents / "a", "again") == answer("again", 2) + "\n"
        stats = _stats(mount.root)
    if kv_disk is None:  # the default: a share of the free space
        assert stats["kv_restores"] == 1 and stats["kv_restore_tokens"] > len(SYSTEM) and stats["prompt_tokens"] < 64
        assert list((mount.state / "kv" / "default").glob("*.kv"))
    else:
        assert stats["kv_restores"] == 0 and stats["prompt_tokens"] > len(SYSTEM) and stats["kv_disk_bytes"] == 0


# the agent's instructions: about 300 tokens of the embedded model, the same every run
REAL_SYSTEM = (
    "You are the records assistant of a small library in a river town. Answer in one short sentence. "
    "The library opens at ten in the morning and closes at seven in the evening, Tuesday to Sunday. "
    "Members may borrow six books for three weeks, and renew them twice online or at the desk. "
    "The reading room on the first floor keeps newspapers from the last two years and the town's maps. "
    "Children's story hour is on Saturday at eleven; the chess club meets on Thursday evenings. "
) * 3
REAL_TURNS = ["When do you open?", "How many books can I borrow?", "What is on Saturday?"]


@needs_fuse
@pytest.mark.mount
@pytest.mark.model
def test_a_restored_turn_is_token_identical_to_the_same_turn_without_the_unmount(tmp_path: Path, model: Path) -> None:
    """Greedy, one agent decoding alone: the third turn after an unmount and a remount (its
    conversation restored from disk) says exactly what it says in a mount that never stopped."""
    args = ["--threads", "2", "--slots", "2", "--ctx", "1024"]
    for run_dir in ("uninterrupted", "remounted"):
        (tmp_path / run_dir).mkdir()
    config = f"system={REAL_SYSTEM}\ntemperature=0\nmax_tokens=24\n"
    with mounted(tmp_path / "uninterrupted", *args) as mount:
        agent = mount.agent("a")
        (agent / "config").write_text(config)
        whole = [_say(agent, turn) for turn in REAL_TURNS]
    with mounted(tmp_path / "remounted", *args) as mount:
        agent = mount.agent("a")
        (agent / "config").write_text(config)
        before = [_say(agent, turn) for turn in REAL_TURNS[:2]]
    with mounted(tmp_path / "remounted", *args) as mount:
        last = _say(mount.agents / "a", REAL_TURNS[2])
        stats = _stats(mount.root)
    assert all(text.strip() for text in whole), whole
    assert before + [last] == whole
    assert stats["kv_restores"] == 1 and stats["kv_restore_tokens"] >= 300, stats  # the instructions and two turns
    assert stats["prompt_tokens"] < 64, stats  # the new question, not the conversation
