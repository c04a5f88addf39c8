"""`scripts/gpu-check --pack DIR`: everything the GPU check needs on a machine without
network, in at most 64 MiB.

* the llama-cpp-python source package (from the package registry, or --src), without
  what building it does not need: its git history, llama.cpp's vocabulary test models,
  docs, tests, examples, the web UI's sources and the ggml backends other than CPU and
  CUDA (5 MB compressed instead of 77 MB);
* this project's files (those git tracks and the new ones it does not ignore);
* wheels of the Python packages the check imports that such a machine may lack (pure
  Python, and rpds-py built for --python-version);
* the embedded model's first layers, as many as fit: the shipped file is 98 MB alone.
  The check writes them back out to the full depth there (setup.gpucheck.gguf), so
  steps cost what the shipped model's steps cost; its answers are not the shipped
  model's, which no check here compares with the CPU's. A model passed with
  ``--model`` there replaces it;
* ``gpu-check``, the command to run there, and ``manifest.json``, what is inside.

The bundle is written beside DIR and moved into place only when it fits.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from ..kit import sha256_of
from . import BUNDLE_LIMIT, LLAMA_CPP_PYTHON, MIB, ROOT, gguf, say

# paths under the source package's top directory that the build does not read
STRIP = [
    ".git",
    ".github",
    "docker",
    "docs",
    "examples",
    "tests",
    "vendor/llama.cpp/.git",
    "vendor/llama.cpp/.github",
    "vendor/llama.cpp/.devops",
    "vendor/llama.cpp/models",  # vocabulary-only GGUF files for llama.cpp's tests: 75 MB
    "vendor/llama.cpp/docs",
    "vendor/llama.cpp/media",
    "vendor/llama.cpp/benches",
    "vendor/llama.cpp/tests",
    "vendor/llama.cpp/examples",
    "vendor/llama.cpp/pocs",
    "vendor/llama.cpp/gguf-py",
    "vendor/llama.cpp/conversion",
    "vendor/llama.cpp/tools/ui/src",  # the web UI is built with npm, which the build here turns off
    "vendor/llama.cpp/tools/ui/tests",
    *(
        f"vendor/llama.cpp/ggml/src/ggml-{b}"
        for b in ("cann", "et", "hexagon", "metal", "musa", "opencl", "openvino", "sycl", "virtgpu", "vulkan", "webgpu", "zdnn", "zendnn")
    ),
]
STRIP_GLOBS = ["vendor/llama.cpp/tools/mtmd/test-*", "vendor/llama.cpp/convert_*.py"]

# distributions the check imports (kernel, bench, llama_cpp's Python side) beyond the standard library;
# numpy and jinja2 (llama_cpp's) are left to the machine: large, compiled, and in every Python image with CUDA
WHEELS = [
    "trio", "outcome", "sniffio", "sortedcontainers", "attrs", "idna",
    "sqlite-utils", "sqlite-fts4", "click", "click-default-group", "tabulate", "python-dateutil", "six", "pluggy",
    "jsonschema", "jsonschema-specifications", "referencing", "rpds-py", "typing-extensions",
    "diskcache", "prometheus-client", "httpx", "httpcore", "h11", "anyio", "certifi",
    "scikit-build-core", "pathspec", "packaging",
]  # fmt: skip
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_28_x86_64", "manylinux_2_24_x86_64"]
MODEL_LAYERS_MIN = 1
LAUNCHER = """#!/bin/sh
# The aiosfs GPU check, from this bundle (made by scripts/gpu-check --pack):
#   sh gpu-check [--out DIR] [--work DIR] [--quick] [--budget SECONDS] [--model GGUF] ...
# unpacks the project into the work directory (default /tmp/aiosfs-gpu-check) and runs
# its scripts/gpu-check --bundle with this directory.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
work=/tmp/aiosfs-gpu-check
prev=
for a in "$@"; do
    [ "$prev" = --work ] && work=$a
    case $a in --work=*) work=${a#--work=} ;; esac
    prev=$a
done
rm -rf "$work/project"
mkdir -p "$work/project"
tar -xzf "$here/project.tar.gz" -C "$work/project"
exec "$work/project/scripts/gpu-check" --bundle "$here" --work "$work" "$@"
"""


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def download_sdist(dest: Path) -> Path:
    say(f"pack: downloading llama-cpp-python {LLAMA_CPP_PYTHON} source from the package registry")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--no-binary",
        ":all:",
        f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
        "-d",
        str(dest),
    ]
    subprocess.run(cmd, check=True)
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise SystemExit("gpu-check --pack: pip downloaded no llama-cpp-python source package")
    return found[0]


def strip_tree(top: Path) -> list[str]:
    """Remove what the build does not need from a source tree; the paths removed."""
    removed = []
    for rel in STRIP:
        path = top / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            removed.append(rel)
        elif path.exists() or path.is_symlink():
            path.unlink()
            removed.append(rel)
    for pattern in STRIP_GLOBS:
        for path in sorted(top.glob(pattern)):
            path.unlink()
            removed.append(str(path.relative_to(top)))
    return removed


def pack_source(src: Path, tmp: Path, dest: Path) -> dict[str, Any]:
    """The stripped source package at `dest` (a .tar.gz with one top directory)."""
    tree = tmp / "tree"
    tree.mkdir()
    if src.is_dir():
        top = tree / src.name
        shutil.copytree(src, top, symlinks=True)
    else:
        with tarfile.open(src) as tar:
            tar.extractall(tree, filter="data")
        (top,) = [p for p in tree.iterdir() if p.is_dir()]
    removed = strip_tree(top)
    with tarfile.open(dest, "w:gz", compresslevel=9) as tar:
        tar.add(top, arcname=top.name)
    return {
        "file": dest.name,
        "from": str(src),
        "from_sha256": sha256_of(src) if src.is_file() else None,
        "removed": removed,
        "bytes": dest.stat().st_size,
    }


def project_files(root: Path, exclude: Path) -> list[str]:
    """The project's files: tracked, and untracked ones git does not ignore; none under `exclude`."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root, capture_output=True, check=True)
    files = []
    for name in sorted(set(out.stdout.decode().split("\0"))):
        path = root / name
        if name and path.is_file() and not path.resolve().is_relative_to(exclude.resolve()):
            files.append(name)
    return files


def pack_project(root: Path, dest: Path, exclude: Path) -> dict[str, Any]:
    files = project_files(root, exclude)
    with tarfile.open(dest, "w:gz", compresslevel=9) as tar:
        for name in files:
            tar.add(root / name, arcname=name)
    described = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True, text=True)
    return {"file": dest.name, "files": len(files), "git": described.stdout.strip(), "bytes": dest.stat().st_size}


def _pinned(name: str) -> str:
    try:
        return f"{name}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return name


def download_wheels(dest: Path, python_version: str) -> dict[str, Any]:
    dest.mkdir()
    base = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", python_version]
    base += ["--implementation", "cp", *(f"--platform={p}" for p in PLATFORMS), "-d", str(dest)]
    wanted = [_pinned(n) for n in WHEELS]
    say(f"pack: {len(wanted)} wheels for Python {python_version}")
    missing = []
    if subprocess.run([*base, *wanted], capture_output=True).returncode != 0:
        for spec in wanted:  # one by one, to say which one is not there
            if subprocess.run([*base, spec], capture_output=True).returncode != 0:
                missing.append(spec)
    return {"python_version": python_version, "wheels": sorted(p.name for p in dest.glob("*.whl")), "missing": missing, "bytes": size_of(dest)}


def pack_model(model: Path, dest: Path, room: int) -> dict[str, Any]:
    """`model`'s first layers, as many as `room` bytes hold."""
    header = gguf.read_header(model)
    fixed, per_layer = gguf.layer_bytes(header)
    keep = min(header.block_count, (room - fixed) // max(per_layer, 1))
    if keep < MODEL_LAYERS_MIN:
        raise SystemExit(f"gpu-check --pack: {model.name} does not fit: {fixed / MIB:.1f} MiB without its layers, {room / MIB:.1f} MiB left")
    kept = gguf.keep_first(model, dest, keep)
    say(f"pack: the model's first {keep} of {header.block_count} layers ({dest.stat().st_size / MIB:.1f} MiB)")
    return {
        "file": dest.name,
        "source": model.name,
        "source_sha256": sha256_of(model),
        "source_bytes": model.stat().st_size,
        "layers": header.block_count,
        "kept": kept.block_count,
        "bytes": dest.stat().st_size,
        "note": f"{model.name}'s first {keep} of {header.block_count} layers, written out again to {header.block_count} "
        f"(layer i from layer i % {keep}): the shipped model's shapes and weight formats, not its answers",
    }


def pack(args: argparse.Namespace) -> int:
    dest: Path = args.pack.absolute()
    if dest.exists() and any(dest.iterdir()):
        raise SystemExit(f"gpu-check --pack: {dest} exists and is not empty")
    target = int(args.max_mib * MIB)
    if target > BUNDLE_LIMIT:
        raise SystemExit(f"gpu-check --pack: --max-mib {args.max_mib} is over the {BUNDLE_LIMIT // MIB} MiB that may travel")
    from ..model import shipped_model_path

    model = (args.model or shipped_model_path()).absolute()
    if not model.is_file():
        raise SystemExit(f"gpu-check --pack: model file {model} not found (run scripts/setup, or pass --model)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-pack-") as tmp_name:
        tmp = Path(tmp_name)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
        try:
            sdist = args.src or download_sdist(tmp / "sdist")
            say("pack: stripping the source package")
            manifest: dict[str, Any] = {"made": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
            manifest["llama_cpp_python"] = pack_source(Path(sdist), tmp, staging / f"llama-cpp-python-{LLAMA_CPP_PYTHON}.tar.gz")
            manifest["project"] = pack_project(ROOT, staging / "project.tar.gz", dest)
            manifest["wheels"] = download_wheels(staging / "wheels", args.python_version)
            (staging / "gpu-check").write_text(LAUNCHER)
            (staging / "gpu-check").chmod(0o755)
            room = target - size_of(staging) - 64 * 1024  # the manifest's room
            manifest["model"] = pack_model(model, staging / "model.gguf", room)
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
            total = size_of(staging)
            manifest["bytes"] = total
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
            parts = ", ".join(f"{k} {manifest[k]['bytes'] / MIB:.1f}" for k in ("llama_cpp_python", "project", "wheels", "model"))
            say(f"pack: {total / MIB:.1f} MiB in all ({parts} MiB)")
            if total > BUNDLE_LIMIT:
                raise SystemExit(
                    f"gpu-check --pack: the bundle is {total / MIB:.1f} MiB, over the {BUNDLE_LIMIT // MIB} MiB that may travel: refused"
                )
            if dest.exists():
                dest.rmdir()
            staging.rename(dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    print(f"{dest}: {total / MIB:.1f} MiB")
    print(f"on the GPU machine: sh {dest.name}/gpu-check --out DIR")
    return 0
