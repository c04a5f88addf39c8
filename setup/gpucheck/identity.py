"""Step 3 of the GPU check, in a child process: are greedy answers the same with KV
sharing on and off, and how does the device round prompt rows computed in chunks?

KV sharing lets a job start on cells another sequence computed, so its prompt is no
longer computed in the chunks it would have been alone. On the CPU that changes nothing
only because llama.cpp's flash attention computes prompt rows in 64-row tiles when a
ubatch holds at least 64 of them, and the kernel cuts shared prefixes and prefill
chunks at whole tiles (kernel.params.PREFILL_TILE). CUDA kernels choose their tilings by
batch size, so both are measured here, never assumed:

* ``kv_share``: the in-process kernel on the real backend, N agents of one user with one
  long system prompt on N sequences: one agent asks alone, then all N at once (the first
  for its second turn); the answers with ``kv_share`` on must equal those with it off.
* ``tiles``: one prompt of 256 tokens prefilled in one ubatch, and in chunks of 1, 16,
  32, 64 and 128 rows: which chunkings give bit-identical logits for its last token and
  the same greedy continuation. And a sequence decoded alone, then with other
  sequences' decode rows or prompt rows in its ubatch: the same logits, bit for bit?
  Sharing changes what shares a step, so a decode that depends on its company makes
  answers differ with sharing on and off even where the prefix cut is right.

Each prints one JSON object on stdout; setup.gpucheck.run starts them and judges them.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
from array import array
from pathlib import Path
from typing import Any

import trio

SYSTEM = (
    "You are the assistant of a small bicycle shop. Answer in one or two short sentences. "
    "The shop opens at nine in the morning and closes at six in the evening, Monday to Saturday. "
    "It sells city bikes, mountain bikes and children's bikes, and repairs any bicycle. "
    "A basic service costs forty euros and takes one day; a full service costs ninety euros. "
    "Tyres and tubes are always in stock. Electric bikes are repaired on Tuesdays only. "
    "Customers may rent a city bike for fifteen euros a day. Payment by card or cash. "
) * 2
QUESTIONS = [
    "When do you open?",
    "How much is a basic service?",
    "Can I rent a bike?",
    "Do you fix electric bikes?",
    "Do you sell children's bikes?",
    "Can I pay by card?",
    "How long does a service take?",
    "Are tyres in stock?",
    "Are you open on Sunday?",
    "What does a full service cost?",
    "Do you sell mountain bikes?",
    "Can you fix a flat tyre today?",
    "When do you close?",
    "Is there a discount for students?",
    "Do you repair old bicycles?",
    "How much is a rental for two days?",
]
SECOND_TURN = "And on Saturdays?"
TILE_PROMPT = 256  # every chunk size tried divides it: no partial chunk blurs the comparison
CHUNKS = (1, 16, 32, 64, 128)
BATCH_PEERS = 16


def _backend(model: Path, threads: int, n_slots: int, n_batch: int) -> Any:
    from kernel.cores.backends.llama import LlamaBackend

    return LlamaBackend(model, threads=threads, n_slots=n_slots, n_ctx_seq=1024, n_batch=n_batch)


# -- KV sharing on and off ---------------------------------------------------------------------


async def _conversation(kernel: Any, n: int, max_tokens: int) -> list[str]:
    from kernel import Caller
    from kernel.syscall import Sys, syscall

    caller = Caller(uid=os.getuid(), gid=os.getgid(), pid=os.getpid())
    config = f"system={SYSTEM}\ntemperature=0\nignore_eos=on\nmax_tokens={max_tokens}\n"

    async def ask(agent: Any, text: str) -> Any:
        job = await syscall(kernel, Sys.LLM_SUBMIT, caller, agent, text.encode())
        return job

    async def done(job: Any) -> str:
        while not job.state.finished:
            await job.wait_beyond(len(job.data), 1.0)
        if job.state.value != "done":
            raise RuntimeError(f"job {job.id} ended {job.state.value}: {job.message}")
        return str(job.answer)

    async with trio.open_nursery() as nursery:
        await nursery.start(kernel.run)
        try:
            agents = [await syscall(kernel, Sys.AGENT_CREATE, caller, f"a{i}", 0o755) for i in range(n)]
            for agent in agents:
                await syscall(kernel, Sys.CONFIG_WRITE, caller, agent, config)
            answers = [await done(await ask(agents[0], QUESTIONS[0]))]  # alone: its cells stay cached
            jobs = [await ask(agents[0], SECOND_TURN)] + [await ask(agent, QUESTIONS[i % len(QUESTIONS)]) for i, agent in enumerate(agents) if i]
            answers += [await done(job) for job in jobs]
            return answers
        finally:
            kernel.stop()


def kv_share_run(model: Path, n: int, kv_share: bool, *, threads: int, max_tokens: int) -> dict[str, Any]:
    """The answers of one conversation on `n` sequences, and what the engine counted."""
    from kernel import Kernel, Storage

    tmp = Path(tempfile.mkdtemp(prefix="aiosfs-gpucheck-"))
    backend = _backend(model, threads, n, 256)
    kernel = Kernel(Storage(tmp / "k.db"), backend, kv_share=kv_share)
    try:
        answers = trio.run(_conversation, kernel, n, max_tokens)
        stats = kernel.statistics()
    finally:
        kernel.close()
        kernel.memory.store.close()
        backend.close()
        shutil.rmtree(tmp, ignore_errors=True)
    keys = ("shared_prefix_hits", "shared_prefix_tokens", "prefix_hit_tokens", "prompt_tokens", "generated", "steps")
    return {"answers": answers, "stats": {k: stats.get(k) for k in keys}, "device": backend.info.device, "gpu_layers": backend.info.gpu_layers}


def kv_share(model: Path, n: int, *, threads: int, max_tokens: int) -> dict[str, Any]:
    on = kv_share_run(model, n, True, threads=threads, max_tokens=max_tokens)
    off = kv_share_run(model, n, False, threads=threads, max_tokens=max_tokens)
    differing = [i for i, (a, b) in enumerate(zip(on["answers"], off["answers"], strict=True)) if a != b]
    return {"sequences": n, "identical": not differing, "differing_answers": differing, "on": on, "off": off}


# -- chunked prefill and batch composition ------------------------------------------------------


def _logits(backend: Any, index: int) -> bytes:
    import llama_cpp

    n_vocab = llama_cpp.llama_vocab_n_tokens(backend.vocab)
    ptr = llama_cpp.llama_get_logits_ith(backend.ctx, index)
    return ctypes.string_at(ptr, 4 * n_vocab)


def _prefill(backend: Any, seq: int, tokens: list[int], chunk: int) -> int:
    """`tokens` into `seq` in ubatches of `chunk` rows; the batch index of the last token's logits."""
    from kernel.cores.backends import BatchEntry

    last = 0
    for start in range(0, len(tokens), chunk):
        part = tokens[start : start + chunk]
        if backend.decode([BatchEntry(seq, t, start + i, start + i == len(tokens) - 1) for i, t in enumerate(part)]) != 0:
            raise RuntimeError(f"llama_decode failed prefilling {len(part)} rows")
        last = len(part) - 1
    return last


def _greedy(backend: Any, seqs: list[int], firsts: list[int], positions: list[int], steps: int) -> list[list[int]]:
    """`steps` greedy tokens for each of `seqs`, decoded together, each from its first token."""
    from kernel import parse_config
    from kernel.cores.backends import BatchEntry

    sampler = backend.new_sampler(parse_config("temperature=0\nignore_eos=on\n"), seed=0)
    out = [[t] for t in firsts]
    try:
        pos = list(positions)
        for _ in range(steps):
            if backend.decode([BatchEntry(s, out[i][-1], pos[i], True) for i, s in enumerate(seqs)]) != 0:
                raise RuntimeError(f"llama_decode failed in a batch of {len(seqs)}")
            for i in range(len(seqs)):
                out[i].append(backend.sample(sampler, i))
                pos[i] += 1
    finally:
        backend.free_sampler(sampler)
    return out


def _argmax(logits: bytes) -> int:
    values = array("f", logits)
    return max(range(len(values)), key=values.__getitem__)


def _max_diff(a: bytes, b: bytes) -> float:
    return max((abs(x - y) for x, y in zip(array("f", a), array("f", b), strict=True)), default=0.0)


def tiles(model: Path, *, threads: int, steps: int, chunks: tuple[int, ...] = CHUNKS) -> dict[str, Any]:
    backend = _backend(model, threads, BATCH_PEERS, 512)
    try:
        text = backend.chat_prompt([{"role": "system", "content": SYSTEM * 2}, {"role": "user", "content": QUESTIONS[1]}])
        tokens = backend.tokenize(text)[:TILE_PROMPT]
        if len(tokens) < TILE_PROMPT:
            raise RuntimeError(f"the prompt has {len(tokens)} tokens, fewer than {TILE_PROMPT}")

        def one(chunk: int) -> tuple[bytes, list[int]]:
            backend.seq_clear(0)
            logits = _logits(backend, _prefill(backend, 0, tokens, chunk))
            return logits, _greedy(backend, [0], [_argmax(logits)], [len(tokens)], steps)[0]

        ref_logits, ref_tokens = one(len(tokens))
        rows = []
        for chunk in chunks:
            logits, greedy = one(chunk)
            rows.append(
                {
                    "chunk": chunk,
                    "logits_identical": logits == ref_logits,
                    "max_abs_diff": round(_max_diff(logits, ref_logits), 6),
                    "greedy_identical": greedy == ref_tokens,
                }
            )
        batch = _batch_invariance(backend, tokens, steps)
    finally:
        backend.close()
    return {"prompt_tokens": len(tokens), "greedy_steps": steps, "rows": rows, "batch": batch, "device": backend.info.device}


def _company(backend: Any, prompt: list[int], steps: int, peers: int, rows: int) -> tuple[list[int], list[bytes]]:
    """Sequence 0's greedy tokens and logits, each step's ubatch holding its row, the decode rows of
    `peers` other sequences, and `rows` prompt rows of one more (what a kernel's step mixes)."""
    from kernel.cores.backends import BatchEntry

    for seq in range(BATCH_PEERS):
        backend.seq_clear(seq)
    last = [_argmax(_logits(backend, _prefill(backend, 0, prompt, 64)))]
    for seq in range(1, peers + 1):  # each peer: the first 32 prompt tokens rotated by its number
        own = prompt[seq:32] + prompt[:seq]
        last.append(_argmax(_logits(backend, _prefill(backend, seq, own, len(own)))))
    pos = [len(prompt)] + [32] * peers
    filler, fill_seq, fill_pos = prompt * 8, peers + 1, 0
    tokens, logits = [last[0]], []
    for _ in range(steps):
        entries = [BatchEntry(seq, last[seq], pos[seq], True) for seq in range(peers + 1)]
        if rows:
            if fill_pos + rows > 960:  # within the sequence's 1024 cells
                backend.seq_clear(fill_seq)
                fill_pos = 0
            entries += [BatchEntry(fill_seq, t, fill_pos + i, False) for i, t in enumerate(filler[fill_pos : fill_pos + rows])]
            fill_pos += rows
        if backend.decode(entries) != 0:
            raise RuntimeError(f"llama_decode failed on a ubatch of {len(entries)} rows")
        logits.append(_logits(backend, 0))
        last = [_argmax(_logits(backend, seq)) for seq in range(peers + 1)]
        pos = [p + 1 for p in pos]
        tokens.append(last[0])
    return tokens, logits


def _batch_invariance(backend: Any, prompt: list[int], steps: int) -> list[dict[str, Any]]:
    """Does a sequence's decode depend on what shares its ubatch? Against it decoding alone."""
    alone_tokens, alone_logits = _company(backend, prompt, steps, 0, 0)
    out = []
    for peers, rows, what in (
        (BATCH_PEERS - 2, 0, f"{BATCH_PEERS - 2} other decoding sequences"),
        (0, 16, "16 prompt rows"),
        (0, 64, "64 prompt rows"),
    ):
        tokens, logits = _company(backend, prompt, steps, peers, rows)
        same = sum(a == b for a, b in zip(logits, alone_logits, strict=True))
        out.append({"company": what, "logits_identical_steps": same, "steps": steps, "greedy_identical": tokens == alone_tokens})
    return out


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m setup.gpucheck identity")
    p.add_argument("what", choices=["kv-share", "tiles"])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--sequences", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens per answer")
    args = p.parse_args(argv)
    if args.what == "kv-share":
        result = kv_share(args.model, args.sequences, threads=args.threads, max_tokens=args.tokens)
    else:
        result = tiles(args.model, threads=args.threads, steps=args.tokens)
    print(json.dumps(result), flush=True)
    return 0
