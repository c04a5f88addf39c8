"""What the llama.cpp build check (setup.buildcheck) probes: this machine, the installed
build, and the decode in the check's child process.

* this machine: the CPU's model and flags from /proc/cpuinfo (``cpu_info``), and the
  CMAKE_ARGS for a llama-cpp-python build on it, never with AMX (``cmake_args``);
* the installed build: where llama_cpp and its shared library are, and how it was
  configured (``installed_build``), without loading the library;
* the child: ``probe`` loads the model and greedily decodes a few tokens, and may die by
  a signal when the build uses an instruction this CPU does not run; ``FAULT_ENV`` makes
  it kill itself on purpose.

The child is started as ``python -m setup.buildcheck probe``; nothing here imports
setup.buildcheck.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .kit import fault_if_asked

PROMPT = "The capital of France is"

# Makes the check's child kill itself with a signal, to exercise what follows a build that
# faults: "SIGILL" always, "SIGILL:native" only while the installed build is a native one.
FAULT_ENV = "AIOSFS_BUILDCHECK_FAULT"

# x86 only: GCC and Clang reject these flags on other architectures.
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
# GGML option -> the /proc/cpuinfo flags it needs, for a build without native CPU tuning.
PORTABLE_OPTIONS: dict[str, tuple[str, ...]] = {
    "GGML_AVX": ("avx",),
    "GGML_AVX2": ("avx2",),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "GGML_AVX512_VBMI": ("avx512f", "avx512vbmi"),
    "GGML_AVX512_VNNI": ("avx512f", "avx512_vnni"),
    "GGML_AVX512_BF16": ("avx512f", "avx512_bf16"),
}
VARIANTS = ("native", "portable", "cuda")


class CheckError(Exception):
    """The check could not be run at all (no llama_cpp, no model)."""


# --- this machine -------------------------------------------------------------


@dataclass(frozen=True)
class CpuInfo:
    machine: str
    model: str
    flags: tuple[str, ...]

    @property
    def flags_sha256(self) -> str:
        return hashlib.sha256(" ".join(sorted(self.flags)).encode()).hexdigest()

    @property
    def is_x86(self) -> bool:
        return self.machine in ("x86_64", "AMD64", "i686", "i386")


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    """The CPU's model name and feature flags, from the first processor in /proc/cpuinfo."""
    fields: dict[str, str] = {}
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor is enough
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or fields.get("Model") or fields.get("CPU part") or platform.processor() or "unknown"
    flags = (fields.get("flags") or fields.get("Features") or "").split()
    return CpuInfo(machine=platform.machine(), model=name, flags=tuple(flags))


def cmake_args(variant: str, cpu: CpuInfo | None = None) -> str:
    """CMAKE_ARGS for building llama-cpp-python here, never with AMX.

    ``native``: tuned for this CPU (GGML_NATIVE), AMX left out by compiler flags, because
    with GGML_NATIVE=ON the GGML_AMX_* options are ignored. ``portable``: no native
    tuning, only the instruction sets /proc/cpuinfo lists. ``cuda``: native plus CUDA.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown build variant {variant!r}; one of: {', '.join(VARIANTS)}")
    cpu = cpu or cpu_info()
    args: list[str] = []
    if variant == "cuda":
        args.append("-DGGML_CUDA=on")
    if variant == "portable":
        args.append("-DGGML_NATIVE=OFF")
        if cpu.is_x86:
            have = set(cpu.flags)
            for option, needs in PORTABLE_OPTIONS.items():
                if all(flag in have for flag in needs):
                    args.append(f"-D{option}=ON")
    if cpu.is_x86:
        args.append(f'-DCMAKE_C_FLAGS="{NO_AMX_FLAGS}"')
        args.append(f'-DCMAKE_CXX_FLAGS="{NO_AMX_FLAGS}"')
    return " ".join(args)


# --- the installed build ------------------------------------------------------


@dataclass(frozen=True)
class Build:
    version: str
    package_dir: Path
    library: Path
    library_digest: str
    config: dict[str, str] = field(default_factory=dict)

    @property
    def variant(self) -> str:
        """cuda / native / portable / unknown, from the installed ggml-config.cmake and libraries."""
        if self.config.get("GGML_CUDA", "").upper() in ("ON", "1", "TRUE") or any(self.library.parent.glob("libggml-cuda.*")):
            return "cuda"
        native = self.config.get("GGML_NATIVE", "").upper()
        if native in ("ON", "1", "TRUE"):
            return "native"
        if native in ("OFF", "0", "FALSE"):
            return "portable"
        return "unknown"


def _library_digest(lib_dir: Path) -> str:
    """sha256 over the names, sizes and modification times of the shared libraries: any reinstall changes it."""
    digest = hashlib.sha256()
    for path in sorted(lib_dir.rglob("*")):
        if path.is_file():
            st = path.stat()
            digest.update(f"{path.relative_to(lib_dir)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _ggml_config(dist: str = "llama_cpp_python") -> dict[str, str]:
    """The GGML_* settings the build recorded in its installed ggml-config.cmake ({} when not found)."""
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    for f in files:
        if f.name == "ggml-config.cmake":
            try:
                text = Path(str(f.locate())).read_text(errors="replace")
            except OSError:
                return {}
            return dict(re.findall(r'^set\((GGML_[A-Z0-9_]+) "([^"]*)"\)', text, re.MULTILINE))
    return {}


def installed_build() -> Build:
    """Where the installed llama_cpp and its shared library are, without loading the library."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise CheckError(f"llama_cpp is not installed for {sys.executable}; run scripts/setup")
    package_dir = Path(spec.origin).parent
    lib_dir = package_dir / "lib"
    candidates = sorted(lib_dir.glob("libllama.*")) or sorted(lib_dir.glob("llama.*"))
    if not candidates:
        raise CheckError(f"llama_cpp at {package_dir} has no libllama shared library in {lib_dir}; reinstall it with scripts/setup")
    try:
        version = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return Build(version=version, package_dir=package_dir, library=candidates[0], library_digest=_library_digest(lib_dir), config=_ggml_config())


# --- the child ------------------------------------------------------------------


def _fault_if_asked() -> None:
    """Tests: FAULT_ENV "SIGILL" kills the probe; "SIGILL:native" only a natively tuned build's."""
    if os.environ.get(FAULT_ENV):
        fault_if_asked(FAULT_ENV, installed_build().variant)


def probe(model_path: Path, *, tokens: int, threads: int, gpu: bool) -> dict[str, Any]:
    """Load the model and greedily decode ``tokens`` tokens (runs in the child; may die by a signal)."""
    import ctypes

    import llama_cpp

    started = time.monotonic()
    _fault_if_asked()
    llama_cpp.llama_backend_init()
    result: dict[str, Any] = {
        "gpu_offload_supported": bool(llama_cpp.llama_supports_gpu_offload()),
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
    }
    if gpu and not result["gpu_offload_supported"]:
        result["error"] = (
            "this llama.cpp build cannot offload to a GPU (llama_supports_gpu_offload() is false): it was not built with CUDA, or no GPU is visible"
        )
        return result
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = -1 if gpu else 0
    mdl = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
    if not mdl:
        result["error"] = f"llama.cpp could not load {model_path}"
        return result
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = 128
    cparams.n_batch = 64
    cparams.n_ubatch = 64
    cparams.n_threads = threads
    cparams.n_threads_batch = threads
    cparams.no_perf = True
    ctx = llama_cpp.llama_init_from_model(mdl, cparams)
    if not ctx:
        llama_cpp.llama_model_free(mdl)
        result["error"] = "llama.cpp could not create a context of 128 tokens"
        return result
    loaded = time.monotonic()
    vocab = llama_cpp.llama_model_get_vocab(mdl)
    data = PROMPT.encode()
    buf = (llama_cpp.llama_token * 64)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, 64, True, False)
    sampler = llama_cpp.llama_sampler_init_greedy()
    pieces: list[bytes] = []
    decoded = 0
    try:
        if n <= 0:
            result["error"] = f"could not tokenize the prompt (llama_tokenize returned {n})"
            return result
        batch = llama_cpp.llama_batch_get_one(buf, n)
        for _ in range(tokens):
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                result["error"] = f"llama_decode returned {rc}"
                return result
            token = llama_cpp.llama_sampler_sample(sampler, ctx, -1)
            decoded += 1
            piece = ctypes.create_string_buffer(64)
            size = llama_cpp.llama_token_to_piece(vocab, token, piece, 64, 0, False)
            pieces.append(piece.raw[: max(size, 0)])
            one = (llama_cpp.llama_token * 1)(token)
            batch = llama_cpp.llama_batch_get_one(one, 1)
    finally:
        result.update(
            prompt_tokens=max(n, 0),
            tokens_decoded=decoded,
            text=b"".join(pieces).decode(errors="replace"),
            n_layer=llama_cpp.llama_model_n_layer(mdl),
            load_s=round(loaded - started, 3),
            decode_s=round(time.monotonic() - loaded, 3),
        )
        llama_cpp.llama_sampler_free(sampler)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(mdl)
    return result
