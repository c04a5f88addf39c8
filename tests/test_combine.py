"""Calls that arrive while one is on the wire go together in the next (kernel/cores/combine.py),
and the engine's prompt tokens in batches (kernel/cores/enginehost.py `chat_tokens`)."""

from __future__ import annotations

import concurrent.futures
import errno
import threading
import time

import pytest

from kernel.cores.combine import Combiner
from kernel.cores.enginehost import EngineProcess
from kernel.cores.wire import EngineSpec
from kernel.errors import KernelError


class Wire:
    """A send that blocks until let go, and records its batches."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.entered = threading.Semaphore(0)
        self.go = threading.Event()

    def send(self, items: list[int]) -> list[int | BaseException]:
        self.batches.append(items)
        self.entered.release()
        assert self.go.wait(10)
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]


def queued(combiner: Combiner, n: int) -> None:
    until = time.monotonic() + 10
    while len(combiner._queue) < n:
        assert time.monotonic() < until
        time.sleep(0.001)


def test_calls_that_come_during_a_round_trip_go_together_in_the_next() -> None:
    wire = Wire()
    combiner: Combiner[int, int] = Combiner(wire.send)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        first = pool.submit(combiner.call, 1, 10)
        assert wire.entered.acquire(timeout=10)  # on the wire, alone
        rest = [pool.submit(combiner.call, i, 10) for i in (2, 3, -4, 5)]
        queued(combiner, 4)
        wire.go.set()
        assert first.result(10) == 10
        assert [f.result(10) for f in rest if f is not rest[2]] == [20, 30, 50]
        with pytest.raises(ValueError, match="bad -4"):  # one item's failure is its own
            rest[2].result(10)
    assert wire.batches == [[1], [2, 3, -4, 5]]
    assert (combiner.batches, combiner.items) == (2, 5)


def test_a_failed_round_trip_fails_its_batch_and_the_next_one_still_goes() -> None:
    calls: list[list[int]] = []

    def send(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            raise KernelError(errno.EIO, "the engine died")
        return items

    combiner: Combiner[int, int] = Combiner(send)
    with pytest.raises(KernelError, match="the engine died"):
        combiner.call(1, 10)
    assert combiner.call(2, 10) == 2  # not stuck behind the failure


def test_a_caller_waits_no_longer_than_its_patience_and_its_item_is_never_sent() -> None:
    wire = Wire()
    combiner: Combiner[int, int] = Combiner(wire.send)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(combiner.call, 1, 10)
        assert wire.entered.acquire(timeout=10)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            combiner.call(2, 0.2)  # the round trip before it never ends in time
        assert time.monotonic() - started < 5
        wire.go.set()
        assert first.result(10) == 10
    assert combiner.call(3, 10) == 30
    assert wire.batches == [[1], [3]]  # the item given up on was never sent


def test_prompts_written_at_once_get_their_tokens_in_few_round_trips() -> None:
    """Through a real engine process (the fake model): every answer is the one a call
    of its own gets, a prompt that cannot be encoded fails alone, and the 64 that come
    while one is on the wire go in one round trip."""
    core = EngineProcess(EngineSpec("fake", n_slots=2))
    core.start()
    try:
        prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(64)]
        alone = [core.chat_tokens(p) for p in prompts[:2]]
        before = core._prompts.batches
        bad = [{"role": "user", "content": "\ud800"}]  # a lone surrogate: the fake model cannot encode it
        with concurrent.futures.ThreadPoolExecutor(65) as pool:
            with core._call_lock:  # the channel is busy: the first caller waits for it, the others for the first
                futures = [pool.submit(core.chat_tokens, p) for p in prompts] + [pool.submit(core.chat_tokens, bad)]
                queued(core._prompts, 64)
            concurrent.futures.wait(futures, 30)
        assert [f.result() for f in futures[:2]] == alone
        for i, f in enumerate(futures[:64]):
            assert bytes(f.result()).decode() == f"<|user|>\nquestion {i}<|end|>\n<|assistant|>\n"
        with pytest.raises(KernelError) as caught:
            futures[64].result()
        assert caught.value.errno == errno.EIO and "UnicodeEncodeError" in caught.value.message
        assert core._prompts.batches - before == 2  # the first alone, then the 64 that came meanwhile
        assert core.chat_tokens(prompts[5]) == futures[5].result()  # the engine serves on
    finally:
        core.close()
