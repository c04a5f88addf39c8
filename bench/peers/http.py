"""The HTTP peers: llama_cpp.server and llama.cpp's llama-server under N streaming clients."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from ..load import Cell, chat, closed_loop_threads, warm_threads
from ..servers import free_port, server_process
from ..stats import Record
from ..workloads import EOG_BIAS


def http_chat(client: Any, url: str, body: dict[str, Any], agent: int, max_tokens: int) -> tuple[Record, str]:
    """One streaming /v1/chat/completions request: (record, answer)."""
    start = time.time()
    first = None
    pieces: list[str] = []
    usage: dict[str, Any] = {}
    finish = None
    with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if obj.get("usage"):
                usage = obj["usage"]
            for choice in obj.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    if first is None:
                        first = time.time()
                    pieces.append(content)
                finish = choice.get("finish_reason") or finish
    end = time.time()
    tokens = usage.get("completion_tokens") or (max_tokens if finish == "length" else len(pieces))
    return Record(agent, 0, start, end, first, int(tokens), usage.get("prompt_tokens")), "".join(pieces)


def run_http_peer(cell: Cell, argv: list[str], ready_path: str, port: int, extra_body: dict[str, Any], peer: str) -> tuple[list[Record], float]:
    import httpx

    plan = cell.plan
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/v1/chat/completions"
    with server_process(argv, cell.log_file(peer), base + ready_path):
        limits = httpx.Limits(max_connections=plan.n_agents + 2, max_keepalive_connections=plan.n_agents + 2)
        timeout = httpx.Timeout(connect=10, read=max(60.0, cell.timeout), write=30, pool=30)
        with httpx.Client(limits=limits, timeout=timeout) as client:

            def one(agent: int, messages: list[dict[str, str]], max_tokens: int) -> tuple[Record, str]:
                body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True, **extra_body}
                return http_chat(client, url, body, agent, max_tokens)

            # warm-up: one request alone, then one per agent at once
            record, _ = one(0, chat(plan.warm_system, [], plan.warmup[0]), 16)
            warm_threads(plan.n_agents, lambda a: one(a, chat(plan.warm_system, [], plan.warmup[a]), 8))
            cell.extra["warm_prompt_tokens"] = record.prompt_tokens
            return closed_loop_threads(cell, one)


def run_llama_cpp_server(cell: Cell) -> tuple[list[Record], float]:
    port = free_port()
    t = str(cell.threads)
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(cell.model), "--n_threads", t, "--n_threads_batch", t]
    argv += ["--n_ctx", str(cell.plan.ctx), "--interrupt_requests", "False", "--host", "127.0.0.1", "--port", str(port)]
    bias = {str(t): EOG_BIAS for t in cell.eog}
    cell.extra["argv"] = " ".join(argv[1:])
    return run_http_peer(cell, argv, "/v1/models", port, {"logit_bias": bias}, "llama_cpp.server")


def run_llama_server(cell: Cell) -> tuple[list[Record], float]:
    assert cell.llama_server is not None
    port = free_port()
    n = cell.plan.n_agents
    t = str(cell.threads)
    argv = [str(cell.llama_server), "-m", str(cell.model), "-t", t, "-tb", t, "-np", str(n), "-c", str(n * cell.plan.ctx)]
    argv += ["--cont-batching", "--host", "127.0.0.1", "--port", str(port)]
    cell.extra["argv"] = " ".join(["llama-server", *argv[1:]])
    extra = {"ignore_eos": True, "stream_options": {"include_usage": True}}
    return run_http_peer(cell, argv, "/health", port, extra, "llama-server")
