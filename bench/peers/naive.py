"""The naive peer: one llama_cpp.Llama, one request at a time."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from ..load import Cell, chat, closed_loop_threads, warm_threads
from ..stats import Record
from ..workloads import EOG_BIAS


def run_naive(cell: Cell) -> tuple[list[Record], float]:
    """One Llama, one request at a time. Requests are served by one thread, in arrival
    order (`--naive-mode lock`: each client thread calls the model itself under a lock)."""
    import concurrent.futures

    import llama_cpp

    plan = cell.plan
    llm: Any = llama_cpp.Llama(model_path=str(cell.model), n_threads=cell.threads, n_threads_batch=cell.threads, n_ctx=plan.ctx, verbose=False)
    lock = threading.Lock()
    server = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="naive")
    bias = {t: EOG_BIAS for t in cell.eog}
    mode = cell.extra.setdefault("naive_mode", os.environ.get("AIOSFS_BENCH_NAIVE_MODE", "thread"))

    def generate(messages: list[dict[str, str]], max_tokens: int) -> tuple[float | None, list[str], str | None]:
        first = None
        pieces: list[str] = []
        finish = None
        with lock:
            stream = llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=0.0, logit_bias=bias, stream=True)
            for chunk in stream:
                choice = chunk["choices"][0]
                content = choice.get("delta", {}).get("content")
                if content:
                    if first is None:
                        first = time.time()
                    pieces.append(content)
                finish = choice.get("finish_reason") or finish
        return first, pieces, finish

    def one(agent: int, messages: list[dict[str, str]], max_tokens: int) -> tuple[Record, str]:
        start = time.time()
        if mode == "lock":
            first, pieces, finish = generate(messages, max_tokens)
        else:
            first, pieces, finish = server.submit(generate, messages, max_tokens).result()
        end = time.time()
        tokens = max_tokens if finish == "length" else len(pieces)
        return Record(agent, 0, start, end, first, tokens), "".join(pieces)

    def warm(messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        with lock:
            return dict(llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=0.0, logit_bias=bias))

    try:
        # warm-up, on the thread(s) that will serve: the first generation after load is slow
        if mode == "lock":
            warm_threads(plan.n_agents, lambda a: warm(chat(plan.warm_system, [], plan.warmup[a]), 8))
        for message in plan.warmup[:2]:
            out = (
                warm(chat(plan.warm_system, [], message), 16)
                if mode == "lock"
                else server.submit(warm, chat(plan.warm_system, [], message), 16).result()
            )
            cell.extra["warm_prompt_tokens"] = out["usage"]["prompt_tokens"]
        return closed_loop_threads(cell, one)
    finally:
        server.shutdown(wait=True, cancel_futures=True)
        llm.close()
