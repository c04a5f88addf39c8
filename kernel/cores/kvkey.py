"""What makes a KV state on disk valid: the key of an engine's hibernated sequences
(kernel/cores/hibernate.py).

A sequence's cells may be restored only into an engine that would have computed the
same cells: the same model file (its SHA-256), the same llama.cpp build (the
llama-cpp-python version, a digest of its shared libraries and the CPU features
llama.cpp reports, which choose its kernels), and the same context and tiling (tokens
per sequence, tokens per batch, the prefill tile, the KV cache's type, the device and
the offloaded layers). A file made under another key is discarded, never used. The
exact token prefix is not part of the key: each file holds its tokens, and a restore
keeps only what a prompt has in common with them.

Hashing a model takes seconds per gigabyte, so a file's digest is computed once and
kept in the engine's directory, keyed by its path, size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import params
from .backends import BackendInfo

log = logging.getLogger(__name__)

KEY_VERSION = 1  # the file format and what the runner puts in a cell: bump when either changes
DIGESTS = "digests.json"  # file digests by path, size and mtime, in the engine's KV directory
CHUNK = 8 * 1024 * 1024


def engine_key(kind: str, model: str, info: BackendInfo, directory: Path, alive: Callable[[], None] = lambda: None) -> str:
    """The key of the sequences an engine of `kind` with `model` computes. `alive` is
    called about once a second while a file is hashed (a sign of life for the watchdog)."""
    tile = params.PREFILL_TILE if info.n_batch >= params.PREFILL_TILE else 0
    parts: dict[str, Any] = {
        "version": KEY_VERSION,
        "kind": kind,
        "n_ctx_seq": info.n_ctx_seq,
        "n_batch": info.n_batch,
        "tile": tile,
        "device": info.device,
        "gpu_layers": info.gpu_layers,
    }
    if kind == "llama":
        digests = Digests(directory / DIGESTS, alive)
        parts["model"] = digests.of(Path(model))
        parts["build"] = llama_build(digests)
        parts["kv_type"] = "f16"  # the backend's cache type (kernel/cores/backends/llama.py)
        digests.save()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def llama_build(digests: Digests) -> str:
    """The llama.cpp build this process runs: the package's version, its libraries'
    digests and the CPU features its kernels use."""
    import llama_cpp
    import llama_cpp.llama_cpp as native

    loaded = Path(getattr(native._lib, "_name", "") or Path(llama_cpp.__file__).parent / "lib" / "libllama.so")
    libraries = sorted({path.resolve() for path in loaded.resolve().parent.glob("*.so*") if path.is_file()})
    features = llama_cpp.llama_print_system_info()
    parts = [llama_cpp.__version__, hashlib.sha256(features).hexdigest()] + [f"{path.name}:{digests.of(path)}" for path in libraries]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class Digests:
    """SHA-256 of files, remembered by path, size and mtime_ns across engine starts."""

    def __init__(self, path: Path, alive: Callable[[], None]) -> None:
        self.path = path
        self.alive = alive
        self.used: dict[str, str] = {}  # what this start asked for: only these are kept
        try:
            self.known: dict[str, str] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.known = {}

    def of(self, file: Path) -> str:
        stat = file.stat()
        name = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        digest = self.known.get(name) or self._hash(file)
        self.used[name] = digest
        return digest

    def _hash(self, file: Path) -> str:
        started = time.monotonic()
        last = started
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                if time.monotonic() - last >= 1.0:
                    last = time.monotonic()
                    self.alive()
        log.info("hashed %s in %.1f s (kept for the next start)", file, time.monotonic() - started)
        return digest.hexdigest()

    def save(self) -> None:
        if self.used == self.known:
            return
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            temporary.write_text(json.dumps(self.used, indent=1) + "\n")
            temporary.replace(self.path)
        except OSError as exc:  # the next start hashes again: slower, never wrong
            log.warning("cannot keep file digests in %s: %s", self.path, exc)
            temporary.unlink(missing_ok=True)
