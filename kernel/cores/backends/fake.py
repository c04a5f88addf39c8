"""A deterministic stand-in for llama.cpp, for fast tests of kernel logic.

Tokens are UTF-8 bytes (256 is end-of-generation). The "model" answers every
prompt with `turn N: <last user message in upper case>`, where N counts the user
messages it was shown, so tests can see that context reached it. `step_delay`
makes each decode step take time, so jobs can be caught while running.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from typing import Any

from ...agents.config import AgentConfig
from . import BackendInfo, BatchEntry

EOG = 256
USER_TAG = "<|user|>\n"
END_TAG = "<|end|>\n"


class FakeBackend:
    def __init__(self, n_slots: int = 4, n_ctx_seq: int = 2048, n_batch: int = 64, step_delay: float = 0.0) -> None:
        self.info = BackendInfo("fake", "fake", "-", "cpu", 1, 0, n_slots, n_ctx_seq, n_batch)
        self.step_delay = step_delay
        self._device_until = 0.0  # when the simulated device ends the batches queued so far (perf_counter)
        self.queues_decodes = step_delay > 0  # a simulated device, which decodes while the host goes on
        self._seqs: dict[int, list[int]] = {}
        self._last: list[tuple[int, int]] = []  # (batch index, seq) of entries with logits
        self.decode_calls: list[list[BatchEntry]] = []  # kept for tests of batching
        self.grammars: list[str | None] = []  # the grammar of every sampler made, for tests of tool steps

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode())

    def chat_tokens(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.tokenize(self.chat_prompt(messages))

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        parts = [f"<|{m['role']}|>\n{m['content']}{END_TAG}" for m in messages]
        return "".join(parts) + "<|assistant|>\n"

    def piece(self, token: int) -> bytes:
        return b"" if token == EOG else bytes([token])

    def is_eog(self, token: int) -> bool:
        return token == EOG

    def seq_clear(self, seq: int) -> None:
        self._seqs.pop(seq, None)

    def warm_up(self) -> None:
        return None

    def seq_trim(self, seq: int, keep: int) -> None:
        del self._seqs.setdefault(seq, [])[keep:]

    def state_get(self, seq: int) -> bytes:
        return bytes(json.dumps(self._seqs.get(seq, [])), "utf-8")

    def state_set(self, seq: int, state: bytes) -> bool:
        self._seqs[seq] = json.loads(state)
        return True

    def decode(self, entries: Sequence[BatchEntry]) -> int:
        """As llama.cpp on a GPU: the simulated device works `step_delay` after the
        batches queued before, and only sampling waits for it."""
        if self.step_delay:
            self._device_until = max(time.perf_counter(), self._device_until) + self.step_delay
        self.decode_calls.append(list(entries))
        self._last = []
        for index, entry in enumerate(entries):
            tokens = self._seqs.setdefault(entry.seq, [])
            if entry.pos != len(tokens):
                return -1  # a position gap is a kernel bug; fail like llama.cpp would
            tokens.append(entry.token)
            if entry.logits:
                self._last.append((index, entry.seq))
        return 0

    def new_sampler(self, config: AgentConfig, seed: int, grammar: str | None = None) -> Any:
        self.grammars.append(grammar)
        return {"reply": None, "ignore_eos": config.ignore_eos, "grammar": grammar}

    def synchronize(self) -> None:
        _device_wait(self._device_until)

    def sample(self, sampler: Any, batch_index: int) -> int:
        self.synchronize()
        seq = dict(self._last)[batch_index]
        tokens = self._seqs[seq]
        if sampler["reply"] is None:
            prompt = bytes(t for t in tokens if t < 256).decode(errors="replace")
            sampler["reply"] = self._tool_reply(prompt, sampler["grammar"]) if sampler["grammar"] else self._reply(prompt)
            sampler["start"] = len(tokens)
        produced = len(tokens) - sampler["start"]
        reply: bytes = sampler["reply"]
        if produced < len(reply):
            return reply[produced]
        return ord(".") if sampler["ignore_eos"] else EOG

    @staticmethod
    def _reply(prompt: str) -> bytes:
        turns = prompt.split(USER_TAG)[1:]
        last = turns[-1].split(END_TAG)[0] if turns else ""
        return f"turn {len(turns)}: {last.strip().upper()}".encode()

    @staticmethod
    def _tool_reply(prompt: str, grammar: str) -> bytes:
        """Under a grammar (a tool step): a user message `call NAME {JSON}` becomes that
        tool call (several, joined by ` ; call `), unless the grammar allows only an
        answer; the results of a turn's calls get `{"answer": "tool said: ..."}`
        with each result's content on a line of its own (`again call ...` makes the
        calls again instead); anything else is answered in upper case."""
        messages = re.findall(r"<\|(\w+)\|>\n(.*?)<\|end\|>\n", prompt, re.S)
        results: list[str] = []
        while messages and messages[-1][0] in ("tool", "assistant"):
            role, text = messages.pop()
            results[:0] = [text.strip()] if role == "tool" else []
        content = messages[-1][1].strip() if messages else ""
        if content.startswith("again "):  # a model that repeats its calls, whatever their results
            content = content.removeprefix("again ")
        elif results:
            return json.dumps({"answer": "tool said: " + "\n".join(results)}).encode()
        if content.startswith("call ") and '"\\"tool\\""' in grammar:
            calls = []
            for part in content[5:].split(" ; call "):
                name, _, arguments = part.partition(" ")
                calls.append({"tool": name, "arguments": json.loads(arguments or "{}")})
            return json.dumps({"calls": calls}).encode()
        return json.dumps({"answer": content.upper()}).encode()

    def free_sampler(self, sampler: Any) -> None:
        sampler.clear()

    def close(self) -> None:
        self._seqs.clear()


SPIN_SECONDS = 0.0002  # the end of a simulated device step is waited for by spinning


def _device_wait(until: float) -> None:
    """Wait for the simulated device until `until` (perf_counter), not longer:
    time.sleep alone overshoots by about 0.1 ms here, which host-ceiling would count
    against the host. Sleep most of it, then spin to the end."""
    left = until - time.perf_counter()
    if left > SPIN_SECONDS:
        time.sleep(left - SPIN_SECONDS)
    while time.perf_counter() < until:
        pass
