"""Perplexity of GGUF models on a fixed text, from llama.cpp's own logits.

Compares weight formats (for example the shipped Q4_1 file and its Q8_0
re-encoding, see ``python -m setup.model encode``): lower is better. The text is
cut into windows of ``ctx`` tokens; each window is decoded on its own and every
token after its first is scored against the logits of the one before.

Command line (also ``scripts/perplexity``)::

    python -m setup.quality MODEL [MODEL ...] [--ctx 256] [--threads 2] [--json]

This loads the model in this process: native llama.cpp code may die here by a
signal on some CPUs. ``python -m setup.model encode`` runs it in a child process.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from kernel.cores.backends import BatchEntry
from kernel.cores.backends.llama import LlamaBackend
from kernel.errors import KernelError

DEFAULT_CTX = 256
DEFAULT_THREADS = 2

# A fixed English text (public domain: the opening of "A Tale of Two Cities" and
# of the US Declaration of Independence), so every run scores the same tokens.
TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness, "
    "it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was the season of "
    "Darkness, it was the spring of hope, it was the winter of despair, we had everything before us, we had nothing "
    "before us, we were all going direct to Heaven, we were all going direct the other way - in short, the period was "
    "so far like the present period, that some of its noisiest authorities insisted on its being received, for good or "
    "for evil, in the superlative degree of comparison only. There were a king with a large jaw and a queen with a "
    "plain face, on the throne of England; there were a king with a large jaw and a queen with a fair face, on the "
    "throne of France. When in the Course of human events, it becomes necessary for one people to dissolve the "
    "political bands which have connected them with another, and to assume among the powers of the earth, the "
    "separate and equal station to which the Laws of Nature and of Nature's God entitle them, a decent respect to the "
    "opinions of mankind requires that they should declare the causes which impel them to the separation. We hold "
    "these truths to be self-evident, that all men are created equal, that they are endowed by their Creator with "
    "certain unalienable Rights, that among these are Life, Liberty and the pursuit of Happiness."
)


class QualityError(Exception):
    """The model could not be loaded or decoded."""


@dataclass(frozen=True)
class Score:
    """The perplexity of one model file on TEXT."""

    path: str
    perplexity: float
    tokens: int  # tokens scored
    ctx: int  # tokens per window
    seconds: float


def perplexity(path: Path | str, *, ctx: int = DEFAULT_CTX, threads: int = DEFAULT_THREADS) -> Score:
    """Load ``path`` and score TEXT in windows of ``ctx`` tokens; raise QualityError when llama.cpp fails."""
    path = Path(path)
    if ctx < 2:
        raise QualityError(f"--ctx must be at least 2, not {ctx}")
    started = time.monotonic()
    try:
        backend = LlamaBackend(path, threads=threads, n_slots=1, n_ctx_seq=ctx, n_batch=ctx)
    except KernelError as exc:
        raise QualityError(str(exc)) from exc
    try:
        tokens = backend.tokenize(TEXT)
        n_vocab = llama_cpp.llama_vocab_n_tokens(backend.vocab)
        nll, scored = 0.0, 0
        for start in range(0, len(tokens) - 1, ctx):
            window = tokens[start : start + ctx]
            if len(window) < 2:
                break
            backend.seq_clear(0)
            rc = backend.decode([BatchEntry(0, t, i, True) for i, t in enumerate(window)])
            if rc != 0:
                raise QualityError(f"llama_decode returned {rc} on {path}")
            for i in range(len(window) - 1):
                row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(backend.ctx, i), shape=(n_vocab,)).astype(np.float64)
                top = float(row.max())
                log_sum = top + math.log(float(np.exp(row - top).sum()))
                nll += log_sum - float(row[window[i + 1]])
                scored += 1
    finally:
        backend.close()
    if scored == 0:
        raise QualityError(f"the text gave no tokens to score on {path}")
    return Score(path=str(path), perplexity=math.exp(nll / scored), tokens=scored, ctx=ctx, seconds=round(time.monotonic() - started, 3))


def main(argv: Sequence[str] | None = None, prog: str = "python -m setup.quality") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+", metavar="MODEL", help="GGUF model files")
    parser.add_argument("--ctx", type=int, default=DEFAULT_CTX, help=f"tokens per scored window (default: {DEFAULT_CTX})")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help=f"CPU threads (default: {DEFAULT_THREADS})")
    parser.add_argument("--json", action="store_true", help="print one JSON object per model instead of a table row")
    args = parser.parse_args(argv)
    for path in args.models:
        try:
            score = perplexity(path, ctx=args.ctx, threads=args.threads)
        except QualityError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(asdict(score)), flush=True)
        else:
            print(f"{path.name}\tperplexity {score.perplexity:.3f}\t({score.tokens} tokens, windows of {score.ctx})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
