"""The llama.cpp backend: llama.cpp through llama-cpp-python's low-level API.

One model, one context holding `n_slots` sequences of `n_ctx_seq` tokens each
(`kv_unified=false`, so every sequence owns its cells), and one llama_sampler
chain per request. Only the engine thread calls the context methods.

Unless told how many, a backend gets as many slots as `kv_budget` bytes of KV cache
hold (f16 keys and values of every layer, `n_ctx_seq` tokens each), up to
`params.MAX_AUTO_SLOTS`: the slots cost memory only, and every busy agent should
find one.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import llama_cpp

from ... import params
from ...agents.config import AgentConfig
from ...errors import KernelError
from . import BackendInfo, BatchEntry

log = logging.getLogger(__name__)

# llama.cpp logs through a C callback; keep a reference so it is never collected.
_LEVELS = {3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level WARN, ERROR


@llama_cpp.llama_log_callback
def _llama_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if level in _LEVELS:  # warnings and errors only: the rest is load chatter
        log.log(_LEVELS[level], "llama.cpp: %s", text.decode(errors="replace").rstrip())


_CALLBACKS: list[Any] = []


def model_name(path: Path) -> str:
    """`SmolLM2-135M-Instruct.Q4_1.gguf` → `smollm2-135m-instruct`."""
    stem = path.name.split(".")[0].lower()
    return stem


def kv_bytes_per_token(model: Any) -> int:
    """Bytes of KV cache one token takes: f16 keys and values of every layer."""
    n_head = max(llama_cpp.llama_model_n_head(model), 1)
    head_dim = llama_cpp.llama_model_n_embd(model) // n_head
    return 2 * 2 * llama_cpp.llama_model_n_layer(model) * llama_cpp.llama_model_n_head_kv(model) * head_dim


def auto_slots(per_token: int, n_ctx_seq: int, budget: int) -> int:
    """As many sequences of `n_ctx_seq` tokens as `budget` bytes hold, 1 to MAX_AUTO_SLOTS."""
    return max(1, min(params.MAX_AUTO_SLOTS, budget // max(per_token * n_ctx_seq, 1)))


class LlamaBackend:
    def __init__(
        self,
        model_path: Path,
        *,
        threads: int | None = None,
        gpu_layers: int | None = None,
        n_slots: int | None = None,
        n_ctx_seq: int = params.DEFAULT_CTX_PER_SLOT,
        kv_budget: int = params.KV_BUDGET_BYTES,
        n_batch: int = params.DEFAULT_BATCH_TOKENS,
        progress: Callable[[float], None] | None = None,
        name: str = "",
    ) -> None:
        """`name`: the model's name in kernel/models and `model=` (default: from the file name);
        `n_slots`: sequences (default: what `kv_budget` holds)."""
        if not model_path.is_file():
            raise KernelError(2, f"model file {model_path} not found")
        llama_cpp.llama_log_set(_llama_log, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        threads = threads or os.cpu_count() or 1
        gpu = bool(llama_cpp.llama_supports_gpu_offload())
        if gpu_layers is None:
            gpu_layers = -1 if gpu else 0  # all layers on the GPU when there is one
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = gpu_layers if gpu else 0
        callback = self._progress_callback(progress)
        mparams.progress_callback = callback
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
        if not self.model:
            raise KernelError(5, f"llama.cpp could not load {model_path}: is it a GGUF model file?")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        n_layer = llama_cpp.llama_model_n_layer(self.model)
        if n_slots is None:
            n_slots = auto_slots(kv_bytes_per_token(self.model), n_ctx_seq, kv_budget)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_slots * n_ctx_seq
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_slots
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.kv_unified = False
        cparams.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise KernelError(12, f"llama.cpp could not create a context of {cparams.n_ctx} tokens")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._template = llama_cpp.llama_model_chat_template(self.model, None)
        offloaded = min(gpu_layers if gpu_layers >= 0 else n_layer + 1, n_layer + 1) if gpu else 0
        self.info = BackendInfo(
            name=name or model_name(model_path),
            backend="llama.cpp",
            path=str(model_path),
            device=("gpu" if gpu and offloaded else "cpu"),
            threads=threads,
            gpu_layers=offloaded,
            n_slots=n_slots,
            n_ctx_seq=n_ctx_seq,
            n_batch=n_batch,
        )
        self.queues_decodes = self.info.device != "cpu"  # llama_decode on a GPU returns while the batch runs
        self._pieces: dict[int, bytes] = {}
        n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self._eog = [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t)]
        self._n_vocab = n_vocab

    def warm_up(self) -> None:
        """Decode a few tokens once: the first decode after a load repacks weights and
        starts threads, and should not land on the first user's request. Call it from
        the thread that will decode: llama.cpp's OpenMP threads stay bound to the
        first caller, and decoding from another thread afterwards is a third slower."""
        tokens = self.tokenize("Hello")[:4] or [0]
        self.decode([BatchEntry(0, t, i, i == len(tokens) - 1) for i, t in enumerate(tokens)])
        self.seq_clear(0)

    @staticmethod
    def _progress_callback(progress: Callable[[float], None] | None) -> Any:
        def report(fraction: float, user_data: ctypes.c_void_p) -> bool:
            if progress is not None:
                progress(fraction)
            return True

        callback = llama_cpp.llama_progress_callback(report)
        _CALLBACKS.append(callback)  # the C side holds a pointer during the load
        return callback

    # -- vocabulary and template (any thread) --------------------------------
    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        room = len(data) + 16
        buf = (llama_cpp.llama_token * room)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, room, True, True)
        if n < 0:
            room = -n
            buf = (llama_cpp.llama_token * room)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, room, True, True)
        return list(buf[:n])

    def chat_tokens(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.tokenize(self.chat_prompt(messages))

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        encoded = [(m["role"].encode(), m["content"].encode()) for m in messages]
        chat = (llama_cpp.llama_chat_message * len(encoded))(*[llama_cpp.llama_chat_message(r, c) for r, c in encoded])
        size = 2 * sum(len(r) + len(c) for r, c in encoded) + 256
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_chat_apply_template(self._template, chat, len(encoded), True, buf, size)
            if n < 0:
                raise KernelError(22, "the model's chat template is not supported by llama.cpp")
            if n <= size:
                return buf.raw[:n].decode(errors="replace")
            size = n + 1
        raise KernelError(5, "chat template output kept growing")

    def piece(self, token: int) -> bytes:
        cached = self._pieces.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
            cached = buf.raw[: max(n, 0)]
            self._pieces[token] = cached
        return cached

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    # -- the context (engine thread only) ----------------------------------------
    def seq_clear(self, seq: int) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def seq_trim(self, seq: int, keep: int) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, seq, keep, -1)

    def state_get(self, seq: int) -> Any:
        """The sequence's KV cells as a ctypes byte array (kept as is: no extra copy)."""
        size = llama_cpp.llama_state_seq_get_size(self.ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(self.ctx, buf, size, seq)
        return buf if n == size else (ctypes.c_uint8 * n).from_buffer_copy(buf)

    def state_set(self, seq: int, state: Any) -> bool:
        """`state`: what state_get returned, or its bytes (a bytearray is used in place, not copied)."""
        if isinstance(state, ctypes.Array):
            buf = state
        elif isinstance(state, bytearray):
            buf = (ctypes.c_uint8 * len(state)).from_buffer(state)
        else:
            buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        return bool(llama_cpp.llama_state_seq_set_data(self.ctx, buf, len(buf), seq))

    def decode(self, entries: Sequence[BatchEntry]) -> int:
        batch = self.batch
        for i, e in enumerate(entries):
            batch.token[i] = e.token
            batch.pos[i] = e.pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = e.seq
            batch.logits[i] = e.logits
        batch.n_tokens = len(entries)
        return int(llama_cpp.llama_decode(self.ctx, batch))

    def synchronize(self) -> None:
        llama_cpp.llama_synchronize(self.ctx)

    def new_sampler(self, config: AgentConfig, seed: int, grammar: str | None = None) -> Any:
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if grammar is not None:
            constraint = llama_cpp.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
            if not constraint:
                llama_cpp.llama_sampler_free(chain)
                raise KernelError(22, "llama.cpp could not parse the grammar of this request")
            llama_cpp.llama_sampler_chain_add(chain, constraint)
        if config.ignore_eos and self._eog:
            biases = (llama_cpp.llama_logit_bias * len(self._eog))(*[llama_cpp.llama_logit_bias(t, float("-inf")) for t in self._eog])
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_logit_bias(self._n_vocab, len(self._eog), biases))
        if config.temperature <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            return chain
        if config.top_p < 1:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(config.top_p, 1))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(config.temperature))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
        return chain

    def sample(self, sampler: Any, batch_index: int) -> int:
        return int(llama_cpp.llama_sampler_sample(sampler, self.ctx, batch_index))

    def free_sampler(self, sampler: Any) -> None:
        llama_cpp.llama_sampler_free(sampler)

    def close(self) -> None:
        if self.ctx:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            llama_cpp.llama_model_free(self.model)
            self.ctx = None
