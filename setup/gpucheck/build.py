"""Steps 1 and 2 of the GPU check: build llama-cpp-python for this GPU, then prove the
build with every layer offloaded.

The build is for the one architecture ``nvidia-smi`` names (all of them take far
longer), from the source tree the bundle carries, with pip and no network: the wheels
the bundle carries go into a private directory first (``--target WORK/site``), then
llama-cpp-python from its source (``--no-build-isolation``: the machine's own CMake and
scikit-build-core build it). The CMake build directory is kept, so llama-server comes
from the same build (the ggml libraries are compiled once): the tree is configured
again with the server on, and only its target is built.

Step 2 is the project's own build check (setup.buildcheck): a child process loads the
model with ``n_gpu_layers=-1``, decodes a few tokens, and the load log must say that
every layer went to the GPU.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from ..buildprobe import cmake_args
from ..kit import with_path
from . import Ran, say

SERVER_CMAKE = ["-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"]
PROGRESS_EVERY = 20.0


def nvidia_smi(query: str) -> list[str]:
    """`nvidia-smi --query-gpu=QUERY` lines, [] where there is no nvidia-smi or no GPU."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def cuda_arch() -> str | None:
    """The first GPU's compute capability as CMake wants it: "9.0" -> "90"."""
    caps = nvidia_smi("compute_cap")
    return caps[0].replace(".", "") if caps else None


def gpu_info() -> dict[str, Any]:
    lines = nvidia_smi("name,driver_version,memory.total,compute_cap")
    info: dict[str, Any] = {"gpus": lines}
    nvcc = shutil.which("nvcc")
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
        info["nvcc"] = (out.stdout.strip().splitlines() or [""])[-1]
    info["cmake"] = shutil.which("cmake")
    return info


def cuda_library_path() -> str:
    """LD_LIBRARY_PATH with the CUDA toolkit's libraries (beside nvcc) in front, where they are."""
    paths = [p for p in (os.environ.get("LD_LIBRARY_PATH") or "").split(os.pathsep) if p]
    nvcc = shutil.which("nvcc")
    if nvcc:
        for lib in ("lib64", "lib"):
            candidate = Path(nvcc).resolve().parent.parent / lib
            if candidate.is_dir() and str(candidate) not in paths:
                paths.insert(0, str(candidate))
    return os.pathsep.join(paths)


def _toolkit_lib_dirs() -> list[Path]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return []
    root = Path(nvcc).resolve().parent.parent
    return [d for d in (root / "lib64", root / "lib", *root.glob("targets/*/lib")) if d.is_dir()]


def _driver_library() -> Path | None:
    """libcuda (the driver's), where the loader or the usual driver folders have it."""
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True) if shutil.which("ldconfig") else None
    for line in (out.stdout if out else "").splitlines():
        if line.strip().startswith("libcuda.so") and "=>" in line:
            return Path(line.split("=>")[1].strip())
    for folder in (Path("/usr/local/nvidia/lib64"), Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib64")):
        found = sorted(folder.glob("libcuda.so*")) if folder.is_dir() else []
        if found:
            return found[0]
    return None


def cuda_hints(roots: list[str] | None = None) -> tuple[list[str], list[str]]:
    """CMake arguments for the CUDA libraries a toolkit assembled from pip packages lacks, and their folders.

    Such a toolkit (nvcc, the runtime; no cuBLAS, no driver stubs) is what some machines
    with PyTorch have: cuBLAS is then in Python's ``nvidia`` packages, and libcuda where the
    driver put it. CMake is told where each one is; the folders go on LD_LIBRARY_PATH."""
    args: list[str] = []
    folders: list[str] = []
    dirs = _toolkit_lib_dirs()
    if not any(any(d.glob("libcublas.so*")) for d in dirs):
        for entry in roots if roots is not None else sys.path:
            base = Path(entry or ".") / "nvidia"
            if not base.is_dir():
                continue
            libs, lts, heads = (sorted(base.rglob(n)) for n in ("libcublas.so*", "libcublasLt.so*", "cublas_v2.h"))
            if libs and lts and heads:
                args += [f"-DCUDA_cublas_LIBRARY={libs[0]}", f"-DCUDA_cublasLt_LIBRARY={lts[0]}", f"-DCMAKE_CUDA_FLAGS=-I{heads[0].parent}"]
                folders.append(str(libs[0].parent))
                break
    if not any(any((d / "stubs").glob("libcuda.so*")) for d in dirs):
        driver = _driver_library()
        if driver is not None:
            args.append(f"-DCUDA_cuda_driver_LIBRARY={driver}")
    return args, folders


def source_tree(src: Path, work: Path) -> Path:
    """The llama-cpp-python source tree: `src` itself, or the one top directory of the tarball `src`."""
    if src.is_dir():
        return src
    dest = work / "src"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    with tarfile.open(src) as tar:
        tar.extractall(dest, filter="data")
    tops = [p for p in dest.iterdir() if p.is_dir()]
    if len(tops) != 1 or not (tops[0] / "CMakeLists.txt").is_file():
        raise RuntimeError(f"{src} does not hold one llama-cpp-python source tree")
    return tops[0]


def for_this_python(wheel: Path) -> bool:
    """A wheel this Python can install: pure Python, or built for this CPython version (its file name says which)."""
    parts = wheel.name.removesuffix(".whl").split("-")
    tags = parts[-3].split(".") if len(parts) >= 5 else []
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    return any(tag in (here, "py3", f"py{sys.version_info.major}{sys.version_info.minor}") for tag in tags)


def _watch(cmd: list[str], log: Path, *, env: dict[str, str], deadline: float, what: str) -> int:
    """Run `cmd` with its output in `log`, saying every so often how far the build got; -9 past `deadline`."""
    with log.open("ab") as out:
        out.write(("$ " + " ".join(cmd) + "\n").encode())
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    last = time.monotonic()
    while proc.poll() is None:
        time.sleep(1.0)
        if time.monotonic() > deadline:
            os.killpg(proc.pid, 9)
            proc.wait()
            say(f"{what}: out of time, stopped")
            return -9
        if time.monotonic() - last >= PROGRESS_EVERY:
            last = time.monotonic()
            say(f"{what}: {progress(log)}")
    return proc.returncode


def progress(log: Path) -> str:
    """How far a build got, from the end of its log: ninja's [n/m] or make's [ p%]."""
    with log.open("rb") as f:
        f.seek(max(0, log.stat().st_size - 16384))
        tail = f.read()
    steps = re.findall(rb"\[(\d+)/(\d+)\]", tail)
    if steps:
        return f"{steps[-1][0].decode()}/{steps[-1][1].decode()} build steps"
    percent = re.findall(rb"\[\s*(\d+)%\]", tail)
    return f"{percent[-1].decode()} % built" if percent else "configuring"


def first_error(log: Path, lines: int = 12) -> str:
    """The lines around the build log's first error, for the results (the log itself stays on the machine)."""
    text = log.read_text(errors="replace").splitlines()
    at = next((i for i, line in enumerate(text) if re.search(r"CMake Error|error:|Error \d|FAILED:", line)), None)
    return "\n".join(text[at : at + lines] if at is not None else text[-lines:])


def build(src: Path, work: Path, *, wheels: Path | None, deadline: float, jobs: int, server: bool = True) -> dict[str, Any]:
    """Step 1: the carried wheels and llama-cpp-python (CUDA) into WORK/site, then llama-server; what happened."""
    started = time.monotonic()
    result: dict[str, Any] = {"verdict": "failed", "site": None, "llama_server": None}
    arch = cuda_arch()
    if arch is None:
        result["detail"] = "nvidia-smi names no GPU (no NVIDIA GPU, or no driver)"
        return result
    if shutil.which("nvcc") is None and not os.environ.get("CUDACXX"):
        result["detail"] = "CUDA's nvcc is not on the PATH (nor CUDACXX set)"
        return result
    site, build_dir, log = work / "site", work / "build", work / "build.log"
    site.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"")
    env = with_path(dict(os.environ), site)
    env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(jobs)
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--upgrade", "--no-cache-dir", "--target", str(site)]
    carried = sorted(wheels.glob("*.whl")) if wheels else []
    result["wheels_not_for_this_python"] = [w.name for w in carried if not for_this_python(w)]
    carried = [w for w in carried if for_this_python(w)]
    if carried:
        say(f"build: installing {len(carried)} carried wheels into {site}")
        if _watch([*pip, "--no-compile", *map(str, carried)], log, env=env, deadline=deadline, what="wheels") != 0:
            result["detail"] = f"pip could not install the carried wheels (see {log})"
            return result
    tree = source_tree(src, work)
    hints, folders = cuda_hints()
    args = " ".join([cmake_args("cuda"), f"-DCMAKE_CUDA_ARCHITECTURES={arch}", "-DLLAVA_BUILD=OFF", *hints])
    if folders:  # for the build's own checks, and every child after it
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([*folders, *filter(None, [os.environ.get("LD_LIBRARY_PATH")])])
        env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
    result.update(arch=arch, cmake_args=args, source=str(tree), jobs=jobs)
    say(f"build: llama-cpp-python for sm_{arch} with {jobs} jobs (CMAKE_ARGS={args}); log: {log}")
    env["CMAKE_ARGS"] = args
    cmd = [*pip, "-v", "--no-build-isolation", f"--config-settings=build-dir={build_dir}", str(tree)]
    rc = _watch(cmd, log, env=env, deadline=deadline, what="build")
    result["build_s"] = round(time.monotonic() - started, 1)
    if rc != 0:
        result["detail"] = f"pip install of llama-cpp-python {'ran out of time' if rc == -9 else f'failed ({rc})'}; see {log}"
        result["log_excerpt"] = first_error(log)
        return result
    if not has_cuda_build(site):
        result["detail"] = f"the build has no libggml-cuda in {site / 'llama_cpp' / 'lib'}: CUDA was not built"
        return result
    result.update(verdict="ok", site=str(site), detail=f"llama-cpp-python with CUDA for sm_{arch} in {result['build_s']:.0f} s")
    if server:
        result.update(build_server(tree, build_dir, log, env=env, deadline=deadline, jobs=jobs))
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def has_cuda_build(site: Path) -> bool:
    return any((site / "llama_cpp" / "lib").glob("libggml-cuda*"))


def reused(work: Path) -> dict[str, Any]:
    """Step 1 when an earlier run's build is in WORK (--reuse-build): nothing is built again."""
    found = sorted(p for p in (work / "build").rglob("llama-server") if p.is_file() and os.access(p, os.X_OK))
    return {
        "verdict": "ok",
        "site": str(work / "site"),
        "llama_server": str(found[0]) if found else None,
        "detail": f"reused the CUDA build in {work / 'site'} (--reuse-build)",
    }


def build_server(tree: Path, build_dir: Path, log: Path, *, env: dict[str, str], deadline: float, jobs: int) -> dict[str, Any]:
    """llama-server from the same CMake build directory (the libraries are built already)."""
    started = time.monotonic()
    say("build: llama-server from the same build tree")
    if _watch(["cmake", "-S", str(tree), "-B", str(build_dir), *SERVER_CMAKE], log, env=env, deadline=deadline, what="llama-server") != 0:
        return {"llama_server_detail": f"configuring llama-server failed; see {log}"}
    cmd = ["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(jobs)]
    if _watch(cmd, log, env=env, deadline=deadline, what="llama-server") != 0:
        return {"llama_server_detail": f"building llama-server failed or ran out of time; see {log}", "log_excerpt": first_error(log)}
    found = sorted(p for p in build_dir.rglob("llama-server") if p.is_file() and os.access(p, os.X_OK))
    if not found:
        return {"llama_server_detail": f"no llama-server binary under {build_dir}"}
    return {"llama_server": str(found[0]), "llama_server_detail": f"built in {time.monotonic() - started:.0f} s"}


def offload(model: Path, *, gpu: bool, threads: int, timeout: float) -> dict[str, Any]:
    """Step 2: setup.buildcheck's child decode, all layers on the GPU when `gpu`; not recorded."""
    from .. import buildcheck

    started = time.monotonic()
    try:
        outcome, data = buildcheck.check(model, gpu=gpu, threads=threads, timeout=timeout, record=None)
    except buildcheck.CheckError as exc:
        return {"verdict": "failed", "detail": str(exc), "seconds": round(time.monotonic() - started, 1)}
    off = data.get("gpu_offload", {})
    where = (
        f"{off.get('offloaded_layers')}/{off.get('total_layers')} layers on the GPU" if gpu else f"the CPU, {threads} thread{'s' * (threads != 1)}"
    )
    detail = outcome.problem or f"decoded {data['tokens_decoded']} tokens {data['text']!r} on {where}"
    keep = ("llama_cpp_version", "library", "build_variant", "build_config", "system_info", "gpu_offload", "tokens_decoded", "text", "exit")
    return {
        "verdict": "ok" if outcome.ok else "failed",
        "detail": detail,
        "seconds": round(time.monotonic() - started, 1),
        "stderr_tail": "" if outcome.ok else outcome.stderr_tail(),
        **{k: data.get(k) for k in keep},
    }


def ran_detail(ran: Ran) -> str:
    """Why a child failed, in one line."""
    if ran.timed_out:
        return f"did not finish within {ran.seconds:.0f} s"
    last = ran.tail(1)
    return f"exited with {ran.returncode}" + (f": {last}" if last else "")
