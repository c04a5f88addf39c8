"""KV prefixes shared across one user's agents (kernel/cores/placement.py, docs/scheduling.md):
the logic on the deterministic FakeBackend, and token identity, access and eviction on
the real model."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
import trio
from kernel_helpers import OTHER, OWNER, answer, ask, ctl, finished, mkdir, run, running, submit

from kernel import params
from kernel.agents.config import AgentConfig
from kernel.cores.backends.fake import FakeBackend
from kernel.cores.placement import common_prefix
from kernel.cores.runner import Runner, StepCost
from kernel.cores.wire import Admit, Plan, RunnerOptions
from kernel.kernel import Caller, Kernel
from kernel.storage.database import Storage
from kernel.syscall import Sys, syscall

# one kind of agent: a long system prompt that every one of them begins with
SYSTEM = "You are a careful assistant of the accounts team. " * 8  # 400 tokens on the fake (bytes)
SHARED = len(SYSTEM) // params.PREFILL_TILE * params.PREFILL_TILE  # shared in whole tiles


def _kernel(tmp_path: Path, backend: Any, name: str, **options: Any) -> Kernel:
    return Kernel(Storage(tmp_path / f"{name}.db"), backend, **options)


async def _agents(kernel: Kernel, names: list[str], config: str, caller: Caller = OWNER) -> list[Any]:
    agents = []
    for name in names:
        agent = await mkdir(kernel, name, caller)
        await syscall(kernel, Sys.CONFIG_WRITE, caller, agent, config)
        agents.append(agent)
    return agents


def _close(kernel: Kernel) -> None:
    kernel.close()
    kernel.memory.store.close()


# -- the pieces ----------------------------------------------------------------------------


def test_common_prefix_length():
    assert common_prefix([], [1, 2]) == 0
    assert common_prefix([1, 2, 3], [1, 2, 3]) == 3
    assert common_prefix([1, 2, 3], [1, 2]) == 2
    assert common_prefix([5], [6]) == 0
    long = list(range(1000))
    for cut in (0, 1, 499, 500, 998, 999):
        assert common_prefix(long, long[:cut] + [-1] + long[cut + 1 :]) == cut


def test_prefill_chunks_are_sized_from_measured_step_times():
    cost = StepCost()
    assert cost.prefill_budget(512) == min(512, 4 * params.PREFILL_MIN_CHUNK)  # nothing measured yet
    cost.record(0.040, generating=16, prompt=0)  # a decode step of 16 sequences: 40 ms
    cost.record(0.100, generating=0, prompt=500)  # prefill alone: 0.2 ms a token
    assert cost.prefill_budget(512) == int(params.PREFILL_STALL * 0.040 / 0.0002)
    slow = StepCost()
    slow.record(0.001, generating=1, prompt=0)
    slow.record(1.0, generating=0, prompt=100)
    assert slow.prefill_budget(512) == params.PREFILL_MIN_CHUNK  # never starves prefill
    fast = StepCost()
    fast.record(1.0, generating=1, prompt=0)
    fast.record(0.001, generating=0, prompt=100)
    assert fast.prefill_budget(512) == 512  # never beyond the batch


def _admit(key: int, prompt: str, scope: str, agent: str = "") -> Admit:
    return Admit(key, agent or f"a{key}", list(prompt.encode()), AgentConfig(max_tokens=32, temperature=0), 0, None, scope)


def _drain(runner: Runner, plan: Plan, steps: int = 200) -> dict[int, bytes]:
    """Run steps until every job ended; the text each produced."""
    out: dict[int, bytes] = {}
    ended: set[int] = set()
    for _ in range(steps):
        result = runner.step(plan)
        plan = Plan()
        for key, chunk, _n, end in result.outputs:
            out[key] = out.get(key, b"") + chunk
            if end is not None:
                ended.add(key)
        if ended >= set(out) and not runner.placement.slots:
            return out
    raise AssertionError("jobs did not end")


def test_jobs_admitted_together_prefill_the_shared_prefix_once():
    backend = FakeBackend(n_slots=4, n_batch=64)
    reads: list[int] = []
    state_get = backend.state_get
    backend.state_get = lambda seq: reads.append(seq) or state_get(seq)  # type: ignore[method-assign]
    runner = Runner(backend)
    prompts = {k: f"{SYSTEM}<|user|>\nquestion {k}\n<|end|>\n" for k in range(1, 5)}
    out = _drain(runner, Plan(start=[_admit(k, p, "1000") for k, p in prompts.items()]))
    assert {k: v.decode() for k, v in out.items()} == {k: answer(f"question {k}") for k in prompts}
    stats = runner.stats
    total = sum(len(p) for p in prompts.values())
    assert stats["shared_prefix_hits"] == 3
    assert stats["shared_prefix_tokens"] == 3 * SHARED
    assert stats["prompt_tokens"] + stats["shared_prefix_tokens"] == total  # nothing prefilled twice
    shared = sum(1 for call in backend.decode_calls for e in call if e.pos < SHARED)
    assert shared == SHARED  # the shared positions went through llama_decode once
    assert reads == [0]  # and the donor's cells were read once for its three followers


def test_sharing_stays_within_a_scope_and_can_be_turned_off():
    for scopes, options, hits in (
        (["1000", "1001"], RunnerOptions(), 0),
        (["1000", "1000"], RunnerOptions(kv_share=False), 0),
        (["1000", "1000"], RunnerOptions(), 1),
    ):
        runner = Runner(FakeBackend(n_slots=2, n_batch=64), options)
        admits = [_admit(k + 1, f"{SYSTEM}<|user|>\nq{k}\n<|end|>\n", scope) for k, scope in enumerate(scopes)]
        out = _drain(runner, Plan(start=admits))
        assert [out[k].decode() for k in (1, 2)] == [answer("q0"), answer("q1")]
        assert runner.stats["shared_prefix_hits"] == hits, (scopes, options)
    # the empty scope never shares
    runner = Runner(FakeBackend(n_slots=2, n_batch=64))
    _drain(runner, Plan(start=[_admit(k, f"{SYSTEM}<|user|>\nq{k}\n<|end|>\n", "") for k in (1, 2)]))
    assert runner.stats["shared_prefix_hits"] == 0


def test_agents_whose_last_turn_was_short_still_share_their_new_prompt():
    """Each agent's cached sequence begins like the new prompt for a few tokens only, computed a
    row at a time: the runner computes them again in tiles, so the long prefix is shared."""
    runner = Runner(FakeBackend(n_slots=4, n_batch=64))
    _drain(runner, Plan(start=[_admit(k, "<|system|>\nbe brief\n<|user|>\nhi\n<|end|>\n", "1000") for k in (1, 2)]))
    assert runner.stats["shared_prefix_hits"] == 0
    prompts = {k: f"<|system|>\n{SYSTEM}<|user|>\nq{k}\n<|end|>\n" for k in (1, 2)}
    out = _drain(runner, Plan(start=[_admit(k + 2, p, "1000", agent=f"a{k}") for k, p in prompts.items()]))
    assert [out[k + 2].decode() for k in (1, 2)] == [answer("q1"), answer("q2")]
    assert runner.stats["shared_prefix_hits"] == 1 and runner.stats["shared_prefix_tokens"] >= SHARED - params.PREFILL_TILE


def test_a_follower_whose_donor_leaves_prefills_for_itself():
    runner = Runner(FakeBackend(n_slots=2, n_batch=64))
    prompt = f"{SYSTEM}<|user|>\nq\n<|end|>\n"
    runner.step(Plan(start=[_admit(1, prompt, "1000"), _admit(2, prompt, "1000")]))
    follower = runner.placement.keys[2]
    assert follower.donor is runner.placement.keys[1]  # waiting for the donor's prefill
    out = _drain(runner, Plan(release=[1]))  # the donor is cancelled mid-prefill
    assert out[2].decode() == answer("q")
    assert runner.stats["shared_prefix_tokens"] < len(prompt)


def test_a_paused_donor_does_not_hold_its_followers_back():
    runner = Runner(FakeBackend(n_slots=2, n_batch=64))
    prompt = f"{SYSTEM}<|user|>\nq\n<|end|>\n"
    runner.step(Plan(start=[_admit(1, prompt, "1000"), _admit(2, prompt, "1000")]))
    follower = runner.placement.keys[2]
    out: dict[int, bytes] = {}
    for _ in range(100):  # the donor sits out every step: the follower must finish alone
        for key, chunk, _n, _end in runner.step(Plan(paused={1})).outputs:
            out[key] = out.get(key, b"") + chunk
        if 2 not in runner.placement.keys:
            break
    assert out[2].decode() == answer("q") and follower.donor is None
    assert 1 in runner.placement.keys  # the paused one is still there, untouched


def test_the_batch_keeps_its_sequence_ids_contiguous():
    """llama.cpp decodes a run of consecutive sequence ids in one pass: a sequence after
    a gap moves into it, with its cells, and what was in the gap moves out."""
    backend = FakeBackend(n_slots=5, n_batch=64)
    runner = Runner(backend)
    prompts = {k: f"<|user|>\nq{k}\n<|end|>\n" for k in range(1, 5)}
    out: dict[int, bytes] = {}
    for plan in (Plan(start=[_admit(k, p, "") for k, p in prompts.items()]), Plan(paused={2})):
        for key, chunk, _n, _end in runner.step(plan).outputs:
            out[key] = out.get(key, b"") + chunk
        if plan.paused:  # the job on sequence 1 sat out: the one on 3 moved into its place
            assert runner.placement.keys[4].seq == 1 and runner.placement.keys[2].seq == 3 and runner.stats["seq_moves"] == 1
            assert sorted({e.seq for e in backend.decode_calls[-1]}) == [0, 1, 2]
        else:
            assert [runner.placement.keys[k].seq for k in prompts] == [0, 1, 2, 3]
    for key, chunk in _drain(runner, Plan()).items():
        out[key] = out.get(key, b"") + chunk
    assert {k: v.decode() for k, v in out.items()} == {k: answer(f"q{k}") for k in prompts}


# -- through the kernel, on the fake ------------------------------------------------------


def test_one_users_agents_share_a_system_prompt_and_others_do_not(tmp_path):
    kernel = _kernel(tmp_path, FakeBackend(n_slots=4, step_delay=0.001), "k")

    async def body():
        async with running(kernel):
            config = f"system={SYSTEM}\nmax_tokens=32\n"
            mine = await _agents(kernel, ["a", "b", "c"], config)
            (theirs,) = await _agents(kernel, ["d"], config, OTHER)
            jobs = [await submit(kernel, agent, f"hello {agent.name}") for agent in mine]
            jobs.append(await submit(kernel, theirs, "hello d", OTHER))
            return [(await finished(job)).answer for job in jobs]

    assert run(body) == [answer(f"hello {name}") for name in "abcd"]
    stats = kernel.engine.statistics()
    assert stats["shared_prefix_hits"] == 2  # b and c from a; never d, another user's
    assert stats["shared_prefix_tokens"] == 2 * SHARED
    _close(kernel)


@pytest.mark.parametrize("kv_share", [True, False])
def test_a_cancelled_donor_costs_its_followers_nothing(tmp_path, kv_share):
    """a prefills the system prompt that b and c wait for; a is cancelled a few steps
    into it. b then prefills it for itself and c takes it from b: the prompt is still
    prefilled once for the two, and both answer as if a had never been there."""
    kernel = _kernel(tmp_path, FakeBackend(n_slots=3, n_batch=16, step_delay=0.005), "k", kv_share=kv_share)  # 25 steps of prefill: time to cancel

    async def body():
        async with running(kernel):
            a, b, c = await _agents(kernel, ["a", "b", "c"], f"system={SYSTEM}\nmax_tokens=32\n")
            jobs = [await submit(kernel, agent, f"hi {agent.name}") for agent in (a, b, c)]
            while kernel.engine.statistics()["steps"] < 3:  # a few steps into the shared prefill (16 tokens a step)
                await trio.sleep(0.001)
            assert not jobs[0].state.finished and not jobs[0].data  # a is still prefilling
            await ctl(kernel, a, "cancel")
            return [await finished(job) for job in jobs]

    first, *rest = run(body)
    assert first.state.value == "cancelled" and first.errno == errno.ECANCELED
    assert [job.answer for job in rest] == [answer("hi b"), answer("hi c")]
    stats = kernel.engine.statistics()
    prompt = len(SYSTEM) + 40  # the system prompt and a question, in the fake's chat format: well under two of them
    if kv_share:
        assert stats["shared_prefix_hits"] == 1 and stats["shared_prefix_tokens"] >= SHARED  # c took the prefix from b
        assert stats["prompt_tokens"] < 2 * prompt + 3 * 16  # b's whole prompt, a's few steps, c's own question
    else:
        assert stats["shared_prefix_hits"] == 0 and stats["prompt_tokens"] > 2 * len(SYSTEM)  # b and c each prefilled it
    _close(kernel)


# -- on the real model -------------------------------------------------------------------

# about 300 tokens of instructions every agent of the kind begins with
REAL_SYSTEM = (
    "You are a support assistant for a small bicycle shop. Answer in one short sentence. "
    "The shop opens at nine in the morning and closes at six in the evening, Monday to Saturday. "
    "It sells city bikes, mountain bikes and children's bikes, and repairs any bicycle. "
    "A basic service costs forty euros and takes one day; a full service costs ninety euros. "
    "Tyres and tubes are always in stock. Electric bikes are repaired on Tuesdays only. "
    "Customers may rent a city bike for fifteen euros a day. Payment by card or cash. "
) * 3
QUESTIONS = ["When do you open?", "How much is a basic service?", "Can I rent a bike?", "Do you fix electric bikes?"]
REAL_CONFIG = f"system={REAL_SYSTEM}\ntemperature=0\nmax_tokens=24\n"


def _llama(model: Path, n_slots: int) -> Any:
    from kernel.cores.backends.llama import LlamaBackend

    return LlamaBackend(model, threads=2, n_slots=n_slots, n_ctx_seq=1024, n_batch=256)


def _conversation(tmp_path: Path, model: Path, name: str, n_slots: int, plan: Any, **options: Any) -> tuple[list[str], dict[str, Any]]:
    backend = _llama(model, n_slots)
    kernel = _kernel(tmp_path, backend, name, **options)
    try:
        answers = run(lambda: plan(kernel), timeout=600)
        return answers, kernel.engine.statistics()
    finally:
        _close(kernel)
        backend.close()


async def _together_then_alone(kernel: Kernel) -> list[str]:
    """One agent alone, then three at once (they wait for one prefill), then a second turn."""
    async with running(kernel):
        agents = await _agents(kernel, ["a", "b", "c", "d"], REAL_CONFIG)
        first = await ask(kernel, agents[0], QUESTIONS[0])
        jobs = [await submit(kernel, agent, question) for agent, question in zip(agents[1:], QUESTIONS[1:], strict=True)]
        rest = [await finished(job) for job in jobs]
        again = await ask(kernel, agents[1], "And a full service?")
        return [job.answer for job in [first, *rest, again]]


def test_shared_prefixes_give_token_identical_answers_on_the_real_model(tmp_path, model):
    shared, on = _conversation(tmp_path, model, "on", 4, _together_then_alone)
    alone, off = _conversation(tmp_path, model, "off", 4, _together_then_alone, kv_share=False)
    assert all(text.strip() for text in alone), alone
    assert shared == alone
    assert off["shared_prefix_hits"] == 0
    assert on["shared_prefix_hits"] >= 3  # b from a's cached sequence; c and d from b or a
    assert on["shared_prefix_tokens"] >= 3 * 250
    assert on["prompt_tokens"] < off["prompt_tokens"] - 3 * 250  # and they were not prefilled


def test_shared_prefixes_are_token_identical_through_the_engine_process(tmp_path, model):
    """The engine process runs two plans in flight (docs/engine.md): followers are admitted
    a step later than in lock-step, and what they share must still be exact."""
    from kernel.cores.enginehost import EngineProcess
    from kernel.cores.wire import EngineSpec

    def through_a_process(name: str, **options: Any) -> tuple[list[str], dict[str, Any]]:
        core = EngineProcess(EngineSpec("llama", model=str(model), threads=2, n_slots=4, n_ctx_seq=1024))
        core.start()
        kernel = _kernel(tmp_path, core, name, **options)
        try:
            return run(lambda: _together_then_alone(kernel), timeout=600), kernel.engine.statistics()
        finally:
            _close(kernel)
            core.close()

    shared, on = through_a_process("process-on")
    alone, off = through_a_process("process-off", kv_share=False)
    assert all(text.strip() for text in alone), alone
    assert shared == alone
    assert on["shared_prefix_hits"] >= 3 and off["shared_prefix_hits"] == 0


async def _two_users(kernel: Kernel) -> list[str]:
    async with running(kernel):
        (mine,) = await _agents(kernel, ["mine"], REAL_CONFIG)
        (theirs,) = await _agents(kernel, ["theirs"], REAL_CONFIG, OTHER)
        first = await ask(kernel, mine, QUESTIONS[0])
        second = await ask(kernel, theirs, QUESTIONS[0], OTHER)
        return [first.answer, second.answer]


def test_another_users_agent_with_the_same_prompt_shares_nothing_on_the_real_model(tmp_path, model):
    answers, stats = _conversation(tmp_path, model, "users", 2, _two_users)
    assert answers[0] == answers[1] and answers[0].strip()  # the same question, the same answer ...
    assert stats["shared_prefix_hits"] == 0 and stats["shared_prefix_tokens"] == 0  # ... each prefilled by its own user
    assert stats["prompt_tokens"] >= 2 * 250


async def _more_agents_than_slots(kernel: Kernel) -> list[str]:
    """Three agents on two slots, one after another, then each again: cached sequences are
    evicted least recently used while others start on their prefix."""
    async with running(kernel):
        agents = await _agents(kernel, ["a", "b", "c"], REAL_CONFIG)
        answers = [(await ask(kernel, agent, question)).answer for agent, question in zip(agents, QUESTIONS[:3], strict=True)]
        answers += [(await ask(kernel, agent, "Thanks. Anything else?")).answer for agent in agents]
        return answers


def test_shared_prefixes_compose_with_eviction_on_the_real_model(tmp_path, model):
    shared, on = _conversation(tmp_path, model, "on", 2, _more_agents_than_slots, swap_budget=64 * 2**20)
    alone, off = _conversation(tmp_path, model, "off", 2, _more_agents_than_slots, swap_budget=64 * 2**20, kv_share=False)
    assert shared == alone
    assert on["cache_evictions"] >= 2 and on["shared_prefix_hits"] >= 2
    assert on["prefix_hit_tokens"] > 0  # an agent's own cached turn is still reused


def test_the_stats_say_where_a_step_goes(tmp_path):
    kernel = _kernel(tmp_path, FakeBackend(n_slots=2, step_delay=0.001), "k")

    async def body():
        async with running(kernel):
            (agent,) = await _agents(kernel, ["a"], "max_tokens=64\n")
            await ask(kernel, agent, "hello " * 20)

    run(body)
    stats = kernel.statistics()  # the engine has stopped: nothing changes under it
    process, engine = kernel.engine._process_stats, kernel.engine.stats  # unrounded: microseconds on the fake
    assert process["decode_s"] > 0 and process["sample_s"] > 0 and kernel.requests.results.deliver_s > 0
    assert process["runner_s"] > process["decode_s"] + process["sample_s"]  # the runner's own Python
    assert engine["step_s"] > process["runner_s"]  # planning and the boundary
    assert stats["runner_python_s"] == round(process["runner_s"] - process["decode_s"] - process["sample_s"], 3)
    assert stats["plan_ipc_s"] == round(engine["step_s"] - process["runner_s"], 3)
    assert stats["trio_cpu_s"] > 0
    _close(kernel)
