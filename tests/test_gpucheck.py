"""scripts/gpu-check: the model's layers rewritten byte for byte, the source package
stripped to what its build needs, the tile verdicts, and the whole check in its quick
form on the CPU build installed here, so that it cannot rot while no GPU is at hand."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from setup.gpucheck import BUNDLE_LIMIT, gguf
from setup.gpucheck.pack import STRIP, pack_source, strip_tree
from setup.gpucheck.run import judge_tiles

REPO = Path(__file__).resolve().parent.parent


def _tensors(path: Path) -> dict[str, tuple[list[int], int, bytes]]:
    header = gguf.read_header(path)
    out = {}
    with path.open("rb") as f:
        for t in header.tensors:
            f.seek(header.data_start + t.offset)
            out[t.name] = (t.dims, t.ggml_type, f.read(t.span))
    return out


def test_the_models_layers_are_kept_and_written_out_again(tmp_path, model):
    source = gguf.read_header(model)
    assert source.block_count == 30
    same = gguf.keep_first(model, tmp_path / "same.gguf", source.block_count)
    assert same.kv == source.kv and _tensors(tmp_path / "same.gguf") == _tensors(model)  # all layers: the same tensors
    compact = gguf.keep_first(model, tmp_path / "compact.gguf", 2)
    assert compact.block_count == 2 and not any(t.name.startswith("blk.2.") for t in compact.tensors)
    full = gguf.expand(tmp_path / "compact.gguf", tmp_path / "full.gguf", 5)
    assert full.block_count == 5
    small, big = _tensors(tmp_path / "compact.gguf"), _tensors(tmp_path / "full.gguf")
    assert big["blk.3.ffn_up.weight"] == small["blk.1.ffn_up.weight"] and big["blk.4.attn_q.weight"] == small["blk.0.attn_q.weight"]
    assert big["token_embd.weight"] == small["token_embd.weight"]
    fixed, per_layer = gguf.layer_bytes(source)
    assert fixed + 30 * per_layer >= model.stat().st_size - 30 * 4096  # the sizes --pack plans with
    with pytest.raises(gguf.GGUFError):
        gguf.keep_first(model, tmp_path / "none.gguf", 31)


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + b"\0" * 64)
    with pytest.raises(gguf.GGUFError):
        gguf.read_header(bad)


def test_the_source_package_keeps_what_its_build_needs(tmp_path):
    top = tmp_path / "llama_cpp_python-0.3.36"
    keep = [
        "CMakeLists.txt",
        "pyproject.toml",
        "llama_cpp/__init__.py",
        "vendor/llama.cpp/ggml/src/ggml-cuda/fattn.cu",
        "vendor/llama.cpp/tools/server/server.cpp",
    ]
    drop = [
        "vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf",
        ".git/HEAD",
        "vendor/llama.cpp/ggml/src/ggml-vulkan/x.cpp",
        "vendor/llama.cpp/tools/mtmd/test-1.jpeg",
    ]
    for rel in keep + drop:
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        (top / rel).write_text("x")
    sdist = tmp_path / "sdist.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(top, arcname=top.name)
    (tmp_path / "work").mkdir()
    info = pack_source(sdist, tmp_path / "work", tmp_path / "out.tar.gz")
    with tarfile.open(tmp_path / "out.tar.gz") as tar:
        names = {n.removeprefix(top.name + "/") for n in tar.getnames()}
    assert set(keep) <= names and not set(drop) & names
    assert "vendor/llama.cpp/models" in info["removed"] and info["bytes"] > 0
    assert strip_tree(top) and all(not (top / rel).exists() for rel in STRIP)


def _row(chunk: int, same: bool) -> dict[str, object]:
    return {"chunk": chunk, "logits_identical": same, "max_abs_diff": 0.0 if same else 1e-3, "greedy_identical": same}


def test_the_tile_verdicts():
    cpu = judge_tiles({"rows": [_row(1, False), _row(16, False), _row(32, False), _row(64, True), _row(128, True)]})
    assert cpu["verdict"] == "holds" and cpu["tile_measured"] == 64
    anything = judge_tiles({"rows": [_row(c, True) for c in (1, 16, 32, 64, 128)]})
    assert anything["verdict"].startswith("holds (") and anything["tile_measured"] == 1
    broken = judge_tiles({"rows": [_row(1, False), _row(16, False), _row(32, False), _row(64, False), _row(128, True)]})
    assert broken["verdict"] == "does not hold" and broken["tile_measured"] == 128
    assert judge_tiles({"error": "exited with -11"})["verdict"] == "not measured"


@pytest.mark.model
def test_the_quick_check_on_the_cpu(tmp_path, model):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [
        str(REPO / "scripts" / "gpu-check"),
        "--cpu",
        "--quick",
        "--threads",
        "1",  # two OpenMP threads on two busy cores can be ten times slower
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(tmp_path / "out"),
        "--model",
        str(model),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    steps = results["steps"]
    assert {name: step["verdict"] for name, step in steps.items()} == {"build": "skipped", "offload": "ok", "identity": "identical", "speed": "ok"}
    runs = steps["identity"]["runs"]
    assert [r["sequences"] for r in runs] == [1, 4] and all(r["identical"] for r in runs)
    assert runs[1]["on"]["stats"]["shared_prefix_hits"] >= 3 and runs[1]["off"]["stats"]["shared_prefix_hits"] == 0  # it shared, and it did not
    tiles = steps["identity"]["tiles"]
    assert tiles["sizes"] == [1, 16, 32, 64, 128] and tiles["verdict"] == "holds" and tiles["tile_measured"] == 64  # the CPU's rule, measured
    company = tiles["batch"]  # one thread: a decode does not depend on what shares its ubatch (two threads: it does)
    assert len(company) == 3 and all(c["logits_identical_steps"] == c["steps"] == 8 for c in company)
    assert tiles["decode_independent_of_company"] is True
    rows = steps["speed"]["rows"]
    assert {(r["peer"], r["B"]) for r in rows} >= {("raw-batched", 1), ("raw-batched", 4), ("aiosfs-inproc", 1), ("aiosfs-inproc", 4)}
    assert all(r["tok_s"] for r in rows) and steps["speed"]["ceiling"][0]["steps_per_s"] > 0
    assert "| identity | identical |" in (tmp_path / "out" / "gpu-check.md").read_text()
    assert results["wall_s"] < 300


def test_the_bundle_limit_is_what_may_travel():
    assert BUNDLE_LIMIT == 64 * 2**20


def test_a_bundle_fits_and_its_command_runs(tmp_path, model, monkeypatch):
    """--pack with a small source package and no network (wheels left out): the model's layers fill
    what is left of --max-mib, and the bundle's own gpu-check unpacks the project and runs it."""
    from setup.gpucheck import __main__ as cli
    from setup.gpucheck import pack as pack_mod

    top = tmp_path / "src" / "llama_cpp_python-0.3.36"
    (top / "vendor" / "llama.cpp").mkdir(parents=True)
    (top / "CMakeLists.txt").write_text("project(llama_cpp)\n")
    sdist = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(top, arcname=top.name)
    monkeypatch.setattr(pack_mod, "download_wheels", lambda dest, version: dest.mkdir() or {"wheels": [], "missing": [], "bytes": 0})
    bundle = tmp_path / "bundle"
    assert cli.main(["--pack", str(bundle), "--src", str(sdist), "--model", str(model), "--max-mib", "40"]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["bytes"] <= 40 * 2**20 and manifest["model"]["layers"] == 30 and 1 <= manifest["model"]["kept"] < 30
    assert gguf.read_header(bundle / "model.gguf").block_count == manifest["model"]["kept"]
    assert manifest["project"]["files"] > 100 and (bundle / "llama-cpp-python-0.3.36.tar.gz").is_file()
    work = tmp_path / "work"
    proc = subprocess.run(["sh", str(bundle / "gpu-check"), "--work", str(work), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--pack DIR" in proc.stdout, proc.stderr
    assert (work / "project" / "setup" / "gpucheck" / "run.py").is_file()
    with pytest.raises(SystemExit, match="not empty"):
        cli.main(["--pack", str(bundle), "--src", str(sdist), "--model", str(model)])
