"""Backends: what runs a model in the engine. A backend owns one model and one context
with `n_slots` sequences: llama.cpp (llama.py) or the fake model of the tests (fake.py).

Contract: every method except `tokenize`, `chat_prompt` and `info` is called only
from the engine thread. `tokenize` and `chat_prompt` read the vocabulary and the
template, never the context, so the kernel may call them from worker threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ...agents.config import AgentConfig


@dataclass(frozen=True)
class BackendInfo:
    name: str  # short model name, e.g. smollm2-135m
    backend: str  # "llama.cpp" or "fake"
    path: str  # model file or URL
    device: str  # "cpu" or the GPU's name
    threads: int
    gpu_layers: int
    n_slots: int  # sequences decoded together
    n_ctx_seq: int  # context tokens per sequence
    n_batch: int  # tokens per decode step


@dataclass(frozen=True)
class BatchEntry:
    seq: int
    token: int
    pos: int
    logits: bool


class Vocabulary(Protocol):
    """What the kernel itself asks of a model: its shape, its tokens and its chat template
    (a backend, or an engine process, which asks its own)."""

    info: BackendInfo

    def tokenize(self, text: str) -> list[int]: ...

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> str: ...

    def chat_tokens(self, messages: Sequence[dict[str, str]]) -> list[int]: ...  # tokenize(chat_prompt(messages)), in one call


class Backend(Protocol):
    info: BackendInfo

    def tokenize(self, text: str) -> list[int]: ...

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> str: ...

    def chat_tokens(self, messages: Sequence[dict[str, str]]) -> list[int]: ...  # tokenize(chat_prompt(messages)), in one call

    def piece(self, token: int) -> bytes: ...

    def is_eog(self, token: int) -> bool: ...

    def seq_clear(self, seq: int) -> None: ...

    def warm_up(self) -> None: ...

    def seq_trim(self, seq: int, keep: int) -> None: ...

    def state_get(self, seq: int) -> Any: ...  # a bytes-like object with len()

    def state_set(self, seq: int, state: Any) -> bool: ...

    queues_decodes: bool  # decode returns before the device has finished (a GPU's)

    def decode(self, entries: Sequence[BatchEntry]) -> int:
        """Queue one batch. It may return before the device has finished (llama.cpp
        on a GPU does): `sample` and `synchronize` wait for it."""
        ...

    def synchronize(self) -> None:
        """Wait until the device has finished the batches queued so far."""
        ...

    def new_sampler(self, config: AgentConfig, seed: int, grammar: str | None = None) -> Any:
        """A sampler chain for one request; `grammar` (GBNF, rule `root`) constrains it."""
        ...

    def sample(self, sampler: Any, batch_index: int) -> int: ...

    def free_sampler(self, sampler: Any) -> None: ...

    def close(self) -> None: ...
