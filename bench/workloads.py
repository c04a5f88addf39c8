"""The workloads, their seeded prompts and the plan every peer of a run sends."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

PEERS = ["raw-batched", "naive", "llama_cpp.server", "llama-server", "aiosfs-inproc", "aiosfs-noreuse", "aiosfs-mount", "aiosfs-aios-api"]
AIOSFS_PEERS = ("aiosfs-inproc", "aiosfs-noreuse", "aiosfs-mount", "aiosfs-aios-api")  # --scheduler and --slots apply to these
KERNEL_SLOTS = 0  # --slots default: the kernel's own number of KV slots (each run records what it was)
BASELINES = ("raw-batched", "naive", "llama-server")  # the tables show every peer's tok/s as a multiple of these
SHORT_SYSTEM = "You are a helpful assistant."
EOG_BIAS = -1e9  # added to the logits of end-of-generation tokens: never sampled
HIGH_DELAY_S = 1.0  # priority workload: the high-priority agent starts this much after the busy ones
BUSY_FACTOR = 3  # priority workload: busy agents have this many times the requests of the high-priority one
HIGH_PRIORITY = 9

WORDS = (
    "the of and to in is was for on that with as by at from it his an were are which this be "
    "or has had not but first one their its new after who they have her she two been other when "
    "there all during into school time may years more most only over city some world would where "
    "later up such used many can state about national out known university united then made "
    "system river water light garden music village station market winter summer history story "
    "mountain library engine window letter paper stone bridge forest ocean island valley harbor "
    "kitchen teacher student doctor farmer painter writer sailor builder baker singer number "
    "morning evening question answer reason season journey problem picture machine garden "
    "red green blue small large old young quiet bright early late warm cold simple careful "
    "walk read write build carry follow open close begin finish travel listen remember"
).split()


@dataclass(frozen=True)
class Workload:
    name: str
    system_tokens: int  # 0: a short fixed system message
    user_tokens: int
    max_tokens: int
    multi_turn: bool
    requests: int  # default requests (turns) per agent; in `priority`, of the high-priority agent
    priority: bool = False  # agent 0 is high priority, the others are busy low-priority agents
    user_max: int = 0  # > 0: each user message gets a seeded length in [user_tokens, user_max]
    cold: bool = False  # warm up on another system prompt: the measured requests find none of theirs cached

    @property
    def user_text(self) -> str:
        """The user messages' length in words, for the tables."""
        return f"{self.user_tokens}–{self.user_max}" if self.user_max > self.user_tokens else f"~{self.user_tokens}"


WORKLOADS = {
    "decode-heavy": Workload("decode-heavy", 0, 32, 128, False, 4),
    "prefill-heavy": Workload("prefill-heavy", 0, 512, 32, False, 4),
    "multi-turn": Workload("multi-turn", 256, 64, 64, True, 4),
    "priority": Workload("priority", 0, 32, 128, False, 4, priority=True),
    # N agents with the same long system prompt, each request alone (system + a short question)
    "shared-prefix": Workload("shared-prefix", 1600, 16, 32, False, 2, user_max=24, cold=True),
}


def context_per_sequence(w: Workload, requests: int) -> int:
    """Context tokens each sequence needs, rounded up to 256 (template overhead included)."""
    system = w.system_tokens or 16
    turns = requests if w.multi_turn else 1
    need = system + 16 + turns * (max(w.user_tokens, w.user_max) + w.max_tokens + 16) + 64
    return max(512, -(-need // 256) * 256)


class Vocab:
    """Tokenizer only (no weights): to cut seeded texts to exact token counts."""

    def __init__(self, model: Path) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)
        vocab = llama_cpp.llama_model_get_vocab(self.llm._model.model)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.eog = [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)]

    def count(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode(), add_bos=False, special=False))

    def text(self, rng: random.Random, n_tokens: int) -> str:
        words: list[str] = []
        while True:
            words += [rng.choice(WORDS) for _ in range(max(4, n_tokens // 2))]
            tokens = self.llm.tokenize(" ".join(words).encode(), add_bos=False, special=False)
            if len(tokens) >= n_tokens:
                break
        text = self.llm.detokenize(tokens[:n_tokens]).decode(errors="ignore").strip()
        return text[:1].upper() + text[1:] + "."


class Calibrator:
    """A fixed single-sequence generation timed before every run: a run whose
    calibration deviates by more than 20 % from the bench's median is left out of the
    medians (the machine was busier or quieter than usual), when another repetition is left."""

    TOKENS = 32

    def __init__(self, model: Path, threads: int, eog: list[int]) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(str(model), n_threads=threads, n_threads_batch=threads, n_ctx=256, verbose=False)
        self.bias = {t: EOG_BIAS for t in eog}
        self.measure()  # warm-up

    def measure(self) -> float:
        started = time.perf_counter()
        self.llm.create_completion("Once upon a time", max_tokens=self.TOKENS, temperature=0.0, logit_bias=self.bias)
        return round(self.TOKENS / (time.perf_counter() - started), 1)

    def close(self) -> None:
        self.llm.close()


@dataclass
class Plan:
    """What every peer sends: the same system prompt and the same user messages."""

    workload: Workload
    n_agents: int
    requests: int
    system: str
    messages: list[list[str]]  # [agent][request] user message
    warmup: list[str]  # one message per agent, same length, not measured
    ctx: int
    warm_system: str = ""  # the warm-up's system prompt (default: `system`)

    def __post_init__(self) -> None:
        self.warm_system = self.warm_system or self.system

    @property
    def max_tokens(self) -> int:
        return self.workload.max_tokens

    @property
    def total_requests(self) -> int:
        return sum(len(m) for m in self.messages)

    def start_delay(self, agent: int) -> float:
        """Seconds an agent waits after the others start: in the priority workload the
        high-priority agent arrives while the busy ones already run."""
        return HIGH_DELAY_S if self.workload.priority and agent == 0 and self.n_agents > 1 else 0.0

    def busy(self, agent: int) -> bool:
        """A busy low-priority agent: it starts no new request once agent 0 is done."""
        return self.workload.priority and agent > 0

    def priority_of(self, agent: int) -> int | None:
        """The `priority` config value of an agent (None: left at the default)."""
        if not self.workload.priority:
            return None
        return HIGH_PRIORITY if agent == 0 else 0


class Texts(Protocol):
    """Where a plan's seeded texts come from: `Vocab`, or `FakeVocab` under --fake."""

    eog: list[int]

    def text(self, rng: random.Random, n_tokens: int) -> str: ...


def make_plan(vocab: Texts, w: Workload, n_agents: int, requests: int, seed: int) -> Plan:
    rng = random.Random(f"{seed}-{w.name}")
    system = vocab.text(rng, w.system_tokens) if w.system_tokens else SHORT_SYSTEM
    counts = [requests * (BUSY_FACTOR if w.priority and a > 0 else 1) for a in range(n_agents)]
    messages = [[vocab.text(rng, user_length(rng, w)) for _ in range(count)] for count in counts]
    warmup = [vocab.text(rng, min(w.user_tokens, 64)) for _ in range(n_agents)]
    warm_system = SHORT_SYSTEM if w.cold else system
    return Plan(w, n_agents, requests, system, messages, warmup, context_per_sequence(w, requests), warm_system)


def user_length(rng: random.Random, w: Workload) -> int:
    """The token count of one user message: fixed, or seeded in [user_tokens, user_max]."""
    return rng.randint(w.user_tokens, w.user_max) if w.user_max > w.user_tokens else w.user_tokens


class FakeVocab:
    """`--fake`: the fake backend's tokens are UTF-8 bytes, so a text of n "tokens" is n
    characters (no model file needed)."""

    def __init__(self) -> None:
        self.eog: list[int] = []

    def count(self, text: str) -> int:
        return len(text.encode())

    def text(self, rng: random.Random, n_tokens: int) -> str:
        words: list[str] = []
        while len(" ".join(words)) < n_tokens:
            words.append(rng.choice(WORDS))
        text = " ".join(words)[:n_tokens].strip()
        return text[:1].upper() + text[1:] + "."


class FakeCalibrator:
    """`--fake`: no model to time; every run's calibration is left out (None)."""

    TOKENS = Calibrator.TOKENS

    def measure(self) -> float | None:
        return None

    def close(self) -> None:
        return None
