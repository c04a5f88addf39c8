"""The llama.cpp build check: a child that dies by a signal calls for a rebuild, a clean one is recorded."""

from __future__ import annotations

import importlib.metadata
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from setup import buildcheck, buildprobe
from setup.buildcheck import Outcome
from setup.buildprobe import CpuInfo
from setup.kit import sha256_of

REPO = Path(__file__).resolve().parent.parent
RESULT = json.dumps({"tokens_decoded": 4, "text": " Paris", "gpu_offload_supported": False, "system_info": "CPU : AVX2 = 1"})


def child(code: str, *, tokens: int = 4, gpu: bool = False, timeout: float = 60) -> Outcome:
    return buildcheck.judge(buildcheck.run_child([sys.executable, "-c", code], timeout=timeout), tokens=tokens, gpu=gpu)


# --- how the child ended ----------------------------------------------------------


def test_a_child_killed_by_sigill_calls_for_a_rebuild() -> None:
    outcome = child("import os, signal, sys; print('decoding', file=sys.stderr, flush=True); os.kill(os.getpid(), signal.SIGILL)")
    assert outcome.returncode < 0
    assert outcome.signal_name == "SIGILL"
    assert outcome.rebuild_may_help
    assert not outcome.ok
    assert "SIGILL" in outcome.problem
    assert "decoding" in outcome.stderr_tail()


def test_a_child_killed_by_sigsegv_calls_for_a_rebuild_too() -> None:
    outcome = child("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert outcome.signal_name == "SIGSEGV"
    assert outcome.rebuild_may_help


def test_a_clean_exit_with_its_result_is_ok() -> None:
    outcome = child(f"print('load chatter'); print({RESULT!r})")
    assert outcome.ok, outcome.problem
    assert not outcome.rebuild_may_help
    assert outcome.result["text"] == " Paris"


def test_a_python_error_fails_without_calling_for_a_rebuild() -> None:
    outcome = child("raise RuntimeError('no such symbol: llama_decode')")
    assert outcome.returncode == 1
    assert not outcome.ok
    assert not outcome.rebuild_may_help
    assert "exited with status 1" in outcome.problem
    assert "no such symbol" in outcome.stderr_tail()


def test_an_error_the_child_reports_fails_without_calling_for_a_rebuild() -> None:
    outcome = child("import json; print(json.dumps({'error': 'llama.cpp could not load m.gguf'}))")
    assert not outcome.ok
    assert not outcome.rebuild_may_help
    assert outcome.problem == "llama.cpp could not load m.gguf"


def test_too_few_tokens_fail() -> None:
    outcome = child(f"print({RESULT!r})", tokens=8)
    assert not outcome.ok
    assert "decoded 4 tokens, expected 8" in outcome.problem


def test_a_hung_child_times_out_without_calling_for_a_rebuild() -> None:
    outcome = child("import time; time.sleep(30)", timeout=0.5)
    assert outcome.timed_out
    assert not outcome.ok
    assert not outcome.rebuild_may_help
    assert "did not finish" in outcome.problem


OFFLOADED = "load_tensors: offloaded 31/31 layers to GPU\nload_tensors:        CUDA0 model buffer size =    90.00 MiB\nload_tensors:   CPU_Mapped model buffer size =    12.00 MiB\n"


@pytest.mark.parametrize(
    ("log", "ok"),
    [
        (OFFLOADED, True),
        ("load_tensors: offloaded 0/31 layers to GPU\nload_tensors:   CPU_Mapped model buffer size =    98.00 MiB\n", False),
        ("load_tensors: offloaded 31/31 layers to GPU\nload_tensors:   CPU_Mapped model buffer size =    98.00 MiB\n", False),
        ("load_tensors:   CPU_Mapped model buffer size =    98.00 MiB\n", False),
    ],
)
def test_the_gpu_check_requires_every_layer_on_the_gpu(log: str, ok: bool) -> None:
    outcome = child(f"import sys; sys.stderr.write({log!r}); print({RESULT!r})", gpu=True)
    assert outcome.ok is ok, outcome.problem
    if not ok:
        assert "not offloaded to the GPU" in outcome.problem
        assert not outcome.rebuild_may_help


# --- the build's CMAKE_ARGS -------------------------------------------------------

X86_AVX512 = CpuInfo(
    "x86_64",
    "Intel Xeon",
    ("fpu", "avx", "avx2", "fma", "f16c", "avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw", "avx512_vnni", "amx_tile"),
)
X86_AVX2 = CpuInfo("x86_64", "old", ("fpu", "avx", "avx2", "fma", "f16c"))
ARM = CpuInfo("aarch64", "Neoverse", ("fp", "asimd"))
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def test_every_x86_build_leaves_amx_out_with_compiler_flags() -> None:
    for variant in buildprobe.VARIANTS:
        args = shlex.split(buildprobe.cmake_args(variant, X86_AVX512))  # how scikit-build-core reads CMAKE_ARGS
        assert f"-DCMAKE_C_FLAGS={NO_AMX}" in args
        assert f"-DCMAKE_CXX_FLAGS={NO_AMX}" in args


def test_the_native_build_keeps_native_tuning() -> None:
    assert "GGML_NATIVE" not in buildprobe.cmake_args("native", X86_AVX512)
    assert "-DGGML_CUDA=on" in shlex.split(buildprobe.cmake_args("cuda", X86_AVX512))


def test_the_portable_build_names_only_the_instruction_sets_the_cpu_lists() -> None:
    args = shlex.split(buildprobe.cmake_args("portable", X86_AVX512))
    assert "-DGGML_NATIVE=OFF" in args
    for option in ("GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_AVX512", "GGML_AVX512_VNNI"):
        assert f"-D{option}=ON" in args
    assert "-DGGML_AVX512_BF16=ON" not in args  # not listed
    old = shlex.split(buildprobe.cmake_args("portable", X86_AVX2))
    assert "-DGGML_AVX2=ON" in old
    assert not any("AVX512" in a for a in old)


def test_no_x86_flags_on_other_architectures() -> None:
    assert buildprobe.cmake_args("portable", ARM) == "-DGGML_NATIVE=OFF"
    assert buildprobe.cmake_args("native", ARM) == ""


def test_cpu_info_reads_the_first_processor(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 amx_tile\n\nprocessor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n"
    )
    cpu = buildprobe.cpu_info(cpuinfo)
    assert cpu.model == "AMD EPYC"
    assert cpu.flags == ("fpu", "avx2", "amx_tile")


# --- the record -----------------------------------------------------------------

FINGERPRINT = {
    "llama_cpp_version": "0.3.36",
    "library_digest": "aa",
    "cpu_model": "AMD EPYC",
    "cpu_flags_sha256": "bb",
    "model_sha256": "cc",
    "gpu": False,
}


def test_a_record_vouches_only_for_the_same_build_cpu_and_model() -> None:
    record = {"record_version": buildcheck.RECORD_VERSION, "ok": True, "fingerprint": dict(FINGERPRINT)}
    assert buildcheck.record_mismatches(record, dict(FINGERPRINT)) == []
    for key, value in [("library_digest", "rebuilt"), ("cpu_flags_sha256", "other cpu"), ("model_sha256", "other model"), ("gpu", True)]:
        reasons = buildcheck.record_mismatches(record, {**FINGERPRINT, key: value})
        assert len(reasons) == 1 and reasons[0].startswith(key)


def test_a_failed_or_old_record_never_vouches() -> None:
    failed = {"record_version": buildcheck.RECORD_VERSION, "ok": False, "problem": "killed by SIGILL", "fingerprint": dict(FINGERPRINT)}
    assert "SIGILL" in buildcheck.record_mismatches(failed, dict(FINGERPRINT))[0]
    assert buildcheck.record_mismatches({"ok": True, "fingerprint": dict(FINGERPRINT)}, dict(FINGERPRINT))


# --- the real check on the embedded model ------------------------------------------


def test_a_missing_model_is_reported_and_not_taken_for_a_bad_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = buildcheck.main(["check", "--model", str(tmp_path / "missing.gguf"), "--record", str(tmp_path / "r.json")])
    assert rc == buildcheck.EXIT_FAILED
    assert "model file not found" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_a_build_that_faults_exits_3_and_records_the_signal(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(buildprobe.FAULT_ENV, "SIGILL")
    record = tmp_path / "llama-check.json"
    rc = buildcheck.main(["check", "--model", str(model), "--record", str(record)])
    err = capsys.readouterr().err
    assert rc == buildcheck.EXIT_SIGNAL
    assert "killed by SIGILL" in err
    assert "killing this process with SIGILL" in err  # the child's stderr tail
    data = json.loads(record.read_text())
    assert data["ok"] is False
    assert data["exit"]["signal"] == "SIGILL"
    assert buildcheck.main(["status", "--record", str(record)]) == buildcheck.EXIT_FAILED


@pytest.mark.model
def test_the_real_check_decodes_on_the_embedded_model_and_records_it(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record = tmp_path / "llama-check.json"
    rc = buildcheck.main(["check", "--model", str(model), "--record", str(record)])
    err = capsys.readouterr().err
    assert rc == buildcheck.EXIT_OK, err
    data = json.loads(record.read_text())
    assert data["ok"] is True and data["problem"] == ""
    assert data["tokens_decoded"] == buildcheck.DEFAULT_TOKENS
    assert data["text"]
    assert data["llama_cpp_version"] == importlib.metadata.version("llama_cpp_python")
    assert Path(data["library"]).is_file()
    assert data["build_variant"] in ("native-no-amx", "native-amx", "portable", "cuda", "unknown")
    assert data["cpu"]["model"] == buildprobe.cpu_info().model
    assert data["gpu_offload"]["requested"] is False
    assert data["exit"] == {"returncode": 0, "signal": None, "timed_out": False}
    assert data["fingerprint"]["model_sha256"] == sha256_of(model)
    assert data["checked_at"]
    assert buildcheck.main(["status", "--record", str(record)]) == buildcheck.EXIT_OK
    assert "verified" in capsys.readouterr().out
    assert buildcheck.main(["status", "--gpu", "--record", str(record)]) == buildcheck.EXIT_FAILED  # a CPU check does not vouch for the GPU


def test_the_command_line_exit_status_reaches_the_shell(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "setup.buildcheck", "check", "--model", str(tmp_path / "missing.gguf"), "--no-record"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == buildcheck.EXIT_FAILED
    assert "model file not found" in proc.stderr


# --- scripts/setup ----------------------------------------------------------------


def test_setup_builds_without_amx_and_checks_after_the_model_is_in_place() -> None:
    text = (REPO / "scripts" / "setup").read_text()
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "setup")], check=False).returncode == 0
    assert 'CMAKE_ARGS="$native_args"' in text and "pip install -e" in text
    assert "--no-cache-dir --no-binary llama-cpp-python" in text
    fetch = text.index('run "$py" -m setup.model fetch')
    check = text.index('run "${buildcheck[@]}" check')
    assert fetch < check
    assert "rebuild_llama portable" in text and '"$rc" -eq 3' in text
