"""The wire between the daemon and its engine process: every message that crosses it.

Two socket pairs join the daemon (kernel/cores/engine.py, kernel/cores/enginehost.py's
`EngineProcess`) to the engine process (`python -m kernel.cores.enginehost`); each
carries length-prefixed pickles of the types below, and a message's type is its
kind. Both ends are this code base, so nothing else is on the wire.

The step channel, strictly one request one answer:

| daemon → engine | engine → daemon |
|---|---|
| `EngineSpec`, first | `Progress`…, `Loaded`, then `Ready` once a warm-up decode ran; or `Error` (the child exits 1) |
| `RunnerOptions` (configure) | nothing |
| `Plan` (one engine step, never one token) | `StepResult` |
| `Ping` (the watchdog's look at an idle engine) | `Pong` |
| `Stop` | nothing: the child exits |

The call channel, served by a second thread in the engine so that it never waits
for a step: `Tokenize`, `ChatPrompt` or `ChatTokens` → `Ok` or `Error`.

Jobs are named by keys; the KV cache, saved states and samplers never leave the
engine. The per-job records of a step (`Output`, `End`) stay plain tuples: a step
carries one per job, and a tuple pickles fastest. No record here has `slots=True`:
pickle reads and writes an instance's `__dict__` in C, where a frozen one with slots
goes through Python (a third slower for a `Plan` round trip); and the two that cross
at every step, `Plan` and `StepResult`, are not frozen, whose `__init__` sets each
field through `object.__setattr__`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from .. import params
from ..agents.config import AgentConfig
from ..llm.jobs import JobState
from .backends import BackendInfo

# How a job ended in a step: (state, errno, message).
End = tuple[JobState, int, str]
# What one step reports for one job: (job key, bytes, tokens, end or None while it goes on).
Output = tuple[int, bytes, int, "End | None"]

# The engine's counters (`StepResult.stats`), in kernel/stats order (docs/protocol.md §6).
# The scheduling side counts step_s, preemptions, held_seq_steps and engine_crashes
# (kernel/cores/engine.py); they stay 0 in the engine.
STAT_KEYS = [
    "steps",
    "decode_s",
    "step_s",
    "batch_tokens",
    "batch_seqs",
    "max_seqs",
    "engine_errors",
    "generated",
    "prompt_tokens",
    "jobs_done",
    "decode_errors",
    "preemptions",
    "swaps_out",
    "swaps_in",
    "held_seq_steps",
    "swap_bytes",
    "swap_ms",
    "recomputes",
    "prefix_hit_tokens",
    "cache_evictions",
    "engine_crashes",
    "shared_prefix_hits",
    "shared_prefix_tokens",
    "sample_s",
    "runner_s",
    "prefill_chunk",
    "seq_moves",
    "kv_restores",
    "kv_restore_tokens",
    "kv_hibernated",
    "kv_disk_bytes",
    "kv_disk_discarded",
    "free_steps",
]


# -- the step channel: start-up ----------------------------------------------------------------
@dataclass(frozen=True)
class EngineSpec:
    """What the child loads: a GGUF file through llama.cpp, or the fake model (tests)."""

    kind: str  # "llama" or "fake"
    model: str = ""
    name: str = ""
    threads: int | None = None
    gpu_layers: int | None = None
    n_slots: int | None = None  # None: as many as kv_budget holds (the fake model: DEFAULT_SLOTS)
    n_ctx_seq: int = params.DEFAULT_CTX_PER_SLOT
    kv_budget: int = params.KV_BUDGET_BYTES
    fake_delay: float = 0.0
    kv_dir: str = ""  # where agents' sequences hibernate (kernel/cores/hibernate.py); "" or kv_disk 0: nowhere
    kv_disk: int = 0  # bytes those files may take


@dataclass(frozen=True)
class Progress:
    """Loading the model: the fraction done so far (a sign of life for the watchdog)."""

    fraction: float


@dataclass(frozen=True)
class Loaded:
    """The model is loaded; the warm-up decode comes next."""

    info: BackendInfo


@dataclass(frozen=True)
class Ready:
    """The warm-up decode ran: the engine serves."""

    pid: int


@dataclass(frozen=True)
class Error:
    """A start-up that failed (the child exits), or a call that failed: a KernelError's parts."""

    errno: int
    message: str


# -- the step channel: serving -----------------------------------------------------------------
@dataclass(frozen=True)
class RunnerOptions:
    swap_budget: int = params.SWAP_RAM_BYTES  # bytes of saved KV states kept; beyond, recompute
    kv_reuse: bool = True  # keep a finished job's cells for its agent's next job
    slots: int | None = None  # use fewer of the backend's sequences (tests, benchmarks)
    kv_share: bool = True  # start jobs on another sequence's common prefix, within a scope


@dataclass(frozen=True)
class Admit:
    """A new job's start: its prompt, its sampling settings and its agent (for KV reuse)."""

    key: int
    agent: str
    tokens: list[int]
    config: AgentConfig
    seed: int
    grammar: str | None = None
    scope: str = ""  # jobs of one scope (the submitting uid) may share KV prefixes; "" never shares


@dataclass
class Plan:
    """The scheduler's decisions for one step, applied in this order."""

    release: list[int] = field(default_factory=list)  # running jobs cancelled: free their slot, no output
    forget: list[int] = field(default_factory=list)  # switched-out jobs cancelled: drop what was saved
    switch_out: list[int] = field(default_factory=list)  # running jobs to save (or plan to recompute)
    start: list[Admit | int] = field(default_factory=list)  # new jobs, or keys of switched-out jobs to resume
    paused: set[int] = field(default_factory=set)  # jobs that keep their slot but are left out of batches
    held: set[int] = field(default_factory=set)  # the same, by the priority policy for this step
    # steps the engine may take on its own after this one, the same jobs left out, while no
    # plan has come: nobody waits for a slot, so going on changes no decision of the policy
    free_steps: int = 0


@dataclass
class StepResult:
    """What one step did: every job's new text, and the engine's counters."""

    outputs: list[Output]
    stats: dict[str, float]  # the runner's counters since it started (STAT_KEYS)
    cached_sequences: int
    swapped_bytes: int
    free: bool = False  # a step the engine took on its own (Plan.free_steps), not one the daemon sent


@dataclass(frozen=True)
class Ping:
    """The watchdog's look at an idle engine."""


@dataclass(frozen=True)
class Pong:
    pass


@dataclass(frozen=True)
class Stop:
    """The daemon is done with the engine: it exits."""


PING, PONG, STOP = Ping(), Pong(), Stop()

# What the daemon sends on the step channel after the spec, and what the engine sends back.
Request = RunnerOptions | Plan | Ping | Stop
Reply = Progress | Loaded | Ready | Error | StepResult | Pong


# -- the call channel --------------------------------------------------------------------------
@dataclass(frozen=True)
class Tokenize:
    name: ClassVar[str] = "tokenize"  # in the watchdog's words: "(a tokenize call)"

    text: str


@dataclass(frozen=True)
class ChatPrompt:
    """The model's chat template applied to `messages` (role and content each)."""

    name: ClassVar[str] = "chat_prompt"

    messages: list[dict[str, str]]


@dataclass(frozen=True)
class Ok:
    """A call's answer: the tokens of `Tokenize`, the prompt text of `ChatPrompt`."""

    value: Any


@dataclass(frozen=True)
class ChatTokens:
    """The tokens of the chat template applied to each of `prompts` (its messages), the
    prompts that came together in one round trip: the answer is a list with, for each,
    its tokens or the `Error` that it alone failed with."""

    name: ClassVar[str] = "chat_tokens"

    prompts: list[list[dict[str, str]]]


Call = Tokenize | ChatPrompt | ChatTokens
CallReply = Ok | Error
