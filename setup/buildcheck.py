"""Prove that the installed llama-cpp-python build runs on this machine.

A llama.cpp build can compile and import fine and still die at the first decode:
native ggml builds use every instruction the CPU flags list, and inside some
virtual machines an instruction the flags list faults (AMX ``tilezero``: SIGILL in
``libggml-cpu.so``). The cheap proof is to decode a few tokens of the embedded
model in a child process and look at how the child ended:

* it printed its result and exited 0: the build works here;
* it was killed by a signal (SIGILL, SIGSEGV, ...): the build does not run on this
  CPU, and a build without native CPU tuning may (exit code 3);
* anything else (no model, a Python error, a model llama.cpp cannot load, a build
  that cannot offload when the GPU was asked for): a rebuild will not help (exit 1).

What was verified is recorded next to the model (``<data_dir>/models/llama-check.json``).

Command line::

    python -m setup.buildcheck check [--gpu] [--model PATH]   # decode a few tokens in a child, record it
    python -m setup.buildcheck status                          # does the record match this build, CPU and model?
    python -m setup.buildcheck cmake-args native|portable|cuda # CMAKE_ARGS for a llama-cpp-python build here

What is probed (this machine, the installed build, the child's decode) is in setup.buildprobe.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import kit
from . import model as model_mod
from .buildprobe import VARIANTS, Build, CheckError, CpuInfo, cmake_args, cpu_info, installed_build, probe
from .kit import Ran, sha256_of

RECORD_NAME = "llama-check.json"
RECORD_VERSION = 1
DEFAULT_TOKENS = 4
DEFAULT_THREADS = 2
DEFAULT_TIMEOUT = 300.0

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_SIGNAL = 3

_CPU_BUFFERS = {"CPU", "CPU_Mapped", "CPU_REPACK", "CPU_AARCH64"}


# --- the parent: run the child and judge it ---------------------------------------


@dataclass
class Outcome(Ran):
    """How the check's child ended, and what it reported."""

    result: dict[str, Any] = field(default_factory=dict)
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem and self.signal_name is None and not self.timed_out and self.returncode == 0

    @property
    def rebuild_may_help(self) -> bool:
        """Killed by a signal: the build does not run on this CPU, and one without native tuning may."""
        return self.signal_name is not None

    def stderr_tail(self, lines: int = 15) -> str:
        return "\n".join(self.stderr.rstrip().splitlines()[-lines:])


def offload_from_log(stderr: str) -> dict[str, Any]:
    """What llama.cpp's load log says about GPU offload: offloaded layers and where the model's buffers are."""
    info: dict[str, Any] = {"offloaded_layers": None, "total_layers": None, "buffers": []}
    matches = list(re.finditer(r"offloaded (-?\d+)/(\d+) layers to GPU", stderr))
    if matches:
        m = matches[-1]
        info["offloaded_layers"], info["total_layers"] = int(m.group(1)), int(m.group(2))
    info["buffers"] = sorted(set(re.findall(r"(\S+) model buffer size", stderr)))
    return info


def judge(outcome: Outcome, *, tokens: int, gpu: bool) -> Outcome:
    """Fill in ``outcome.result`` (the child's JSON line) and ``outcome.problem`` (why it failed, or "")."""
    if outcome.timed_out:
        outcome.problem = f"the check did not finish within {outcome.seconds:.0f} s"
        return outcome
    if outcome.signal_name:
        outcome.problem = f"the check's child was killed by {outcome.signal_name}"
        return outcome
    outcome.result = outcome.last_json() or {}
    if outcome.returncode != 0:
        outcome.problem = f"the check's child exited with status {outcome.returncode}"
    elif not outcome.result:
        outcome.problem = "the check's child printed no result"
    elif outcome.result.get("error"):
        outcome.problem = str(outcome.result["error"])
    elif outcome.result.get("tokens_decoded") != tokens:
        outcome.problem = f"decoded {outcome.result.get('tokens_decoded')} tokens, expected {tokens}"
    elif gpu:
        off = offload_from_log(outcome.stderr)
        outcome.result["offload"] = off
        on_gpu = [b for b in off["buffers"] if b not in _CPU_BUFFERS]
        if off["offloaded_layers"] is None or off["offloaded_layers"] != off["total_layers"] or not on_gpu:
            layers = f"{off['offloaded_layers']}/{off['total_layers']}" if off["offloaded_layers"] is not None else "no"
            outcome.problem = (
                f"the model was not offloaded to the GPU ({layers} layers offloaded; model buffers: {', '.join(off['buffers']) or 'none'})"
            )
    return outcome


def run_child(cmd: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT, env: dict[str, str] | None = None) -> Outcome:
    """Run ``cmd`` and capture how it ended; a signal shows as a negative return code."""
    return Outcome(**vars(kit.run_child(cmd, timeout=timeout, env=env)))


def child_command(model_path: Path, *, tokens: int, threads: int, gpu: bool) -> list[str]:
    args = ["probe", str(model_path), "--tokens", str(tokens), "--threads", str(threads)]
    return kit.module_command("setup.buildcheck", *args, *(["--gpu"] if gpu else []))


# --- the record -----------------------------------------------------------------


def record_path() -> Path:
    return model_mod.data_dir() / "models" / RECORD_NAME


def fingerprint(build: Build, cpu: CpuInfo, model_path: Path, *, gpu: bool, model_sha256: str | None = None) -> dict[str, Any]:
    """What a verification holds for: this llama_cpp build, this CPU, this model, CPU or GPU."""
    return {
        "llama_cpp_version": build.version,
        "library_digest": build.library_digest,
        "cpu_model": cpu.model,
        "cpu_flags_sha256": cpu.flags_sha256,
        "model_sha256": model_sha256 or sha256_of(model_path),
        "gpu": gpu,
    }


def record_mismatches(record: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Why ``record`` does not vouch for ``current`` (a fingerprint); [] when it does."""
    if record.get("record_version") != RECORD_VERSION:
        return [f"record version {record.get('record_version')!r}, expected {RECORD_VERSION}"]
    reasons = [
        f"{key}: recorded {record.get('fingerprint', {}).get(key)!r}, now {value!r}"
        for key, value in current.items()
        if record.get("fingerprint", {}).get(key) != value
    ]
    if not record.get("ok"):
        reasons.insert(0, f"the recorded check failed: {record.get('problem', 'no reason recorded')}")
    return reasons


def write_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_record(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def build_variant(build: Build, system_info: str) -> str:
    """The build's variant as recorded: cuda, portable, native-no-amx (or native-amx), unknown."""
    variant = build.variant
    if variant == "native":
        return "native-amx" if "AMX" in system_info else "native-no-amx"
    return variant


def check(
    model_path: Path,
    *,
    gpu: bool = False,
    tokens: int = DEFAULT_TOKENS,
    threads: int = DEFAULT_THREADS,
    timeout: float = DEFAULT_TIMEOUT,
    record: Path | None = None,
) -> tuple[Outcome, dict[str, Any]]:
    """Decode ``tokens`` tokens of ``model_path`` in a child, judge how it ended and record it (when ``record``)."""
    if not model_path.is_file():
        raise CheckError(f"model file not found: {model_path}\nInstall it with: python3 -m setup.model fetch")
    model_sha256 = None
    if model_path in (model_mod.default_model_path(), model_mod.shipped_model_path()):
        try:  # the default model (the re-encoded file when recorded, else the shipped one) or the shipped one
            model_sha256 = model_mod.verify(model_path)
        except model_mod.ModelError as exc:
            raise CheckError(str(exc)) from exc
    build = installed_build()
    cpu = cpu_info()
    outcome = judge(
        run_child(child_command(model_path, tokens=tokens, threads=threads, gpu=gpu), timeout=timeout, env=kit.with_path(dict(os.environ))),
        tokens=tokens,
        gpu=gpu,
    )
    result = outcome.result
    data: dict[str, Any] = {
        "record_version": RECORD_VERSION,
        "ok": outcome.ok,
        "problem": outcome.problem,
        "checked_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "llama_cpp_version": build.version,
        "library": str(build.library),
        "build_variant": build_variant(build, str(result.get("system_info", ""))),
        "build_config": {
            k: v
            for k, v in build.config.items()
            if k in ("GGML_NATIVE", "GGML_CUDA", "GGML_AVX", "GGML_AVX2", "GGML_AVX512", "GGML_CPU_ALL_VARIANTS")
        },
        "system_info": result.get("system_info"),
        "python": sys.executable,
        "cpu": {
            "machine": cpu.machine,
            "model": cpu.model,
            "flags_sha256": cpu.flags_sha256,
            "amx_listed": any(f.startswith("amx") for f in cpu.flags),
        },
        "model": str(model_path),
        "gpu_offload": {
            "requested": gpu,
            "supported": result.get("gpu_offload_supported"),
            "n_gpu_layers": -1 if gpu else 0,
            **result.get("offload", {}),
        },
        "threads": threads,
        "tokens_decoded": result.get("tokens_decoded", 0),
        "text": result.get("text"),
        "seconds": {"load": result.get("load_s"), "decode": result.get("decode_s"), "child": round(outcome.seconds, 3)},
        "exit": {"returncode": outcome.returncode, "signal": outcome.signal_name, "timed_out": outcome.timed_out},
        "fingerprint": fingerprint(build, cpu, model_path, gpu=gpu, model_sha256=model_sha256),
    }
    if record is not None:
        write_record(record, data)
    return outcome, data


# --- command line ---------------------------------------------------------------


def _say(message: str) -> None:
    print(f"setup.buildcheck: {message}", file=sys.stderr, flush=True)


def _indent(text: str) -> str:
    return "\n".join("    | " + line for line in text.splitlines())


def _cmd_check(args: argparse.Namespace) -> int:
    model_path = args.model or model_mod.default_model_path()
    record = None if args.no_record else (args.record or record_path())
    where = "on the GPU (all layers offloaded)" if args.gpu else f"on the CPU ({args.threads} threads)"
    _say(f"decoding {args.tokens} tokens of {model_path.name} {where} in a child process")
    try:
        outcome, data = check(model_path, gpu=args.gpu, tokens=args.tokens, threads=args.threads, timeout=args.timeout, record=record)
    except CheckError as exc:
        _say(f"error: {exc}")
        return EXIT_FAILED
    if outcome.ok:
        _say(
            f"ok: llama-cpp-python {data['llama_cpp_version']} ({data['build_variant']} build) decoded {data['tokens_decoded']} tokens "
            f"{data['text']!r} in {outcome.seconds:.1f} s on {data['cpu']['model']}" + (" with GPU offload" if args.gpu else "")
        )
        if record is not None:
            _say(f"recorded in {record}")
        return EXIT_OK
    tail = outcome.stderr_tail()
    if tail:
        _say("last lines of the child's stderr:\n" + _indent(tail))
    _say(f"FAILED: {outcome.problem}")
    _say(f"library: {data['library']} ({data['build_variant']} build); CPU: {data['cpu']['model']}")
    if record is not None:
        _say(f"recorded in {record}")
    if outcome.rebuild_may_help:
        why = f"{outcome.signal_name} means this build uses an instruction this CPU (or its virtual machine) does not run"
        if data["build_variant"].startswith("native"):
            why += "; a build without native CPU tuning may work"
        _say(why)
        return EXIT_SIGNAL
    return EXIT_FAILED


def _cmd_status(args: argparse.Namespace) -> int:
    path = args.record or record_path()
    record = read_record(path)
    if record is None:
        print(f"no check recorded at {path}; run: python3 -m setup.buildcheck check")
        return EXIT_FAILED
    try:
        gpu = args.gpu or bool(record.get("fingerprint", {}).get("gpu"))
        current = fingerprint(installed_build(), cpu_info(), Path(record.get("model", "")), gpu=gpu)
    except (CheckError, OSError) as exc:
        print(f"cannot compare with {path}: {exc}")
        return EXIT_FAILED
    reasons = record_mismatches(record, current)
    if reasons:
        print(f"{path} does not vouch for this machine's build:")
        for reason in reasons:
            print(f"  {reason}")
        print("run: python3 -m setup.buildcheck check")
        return EXIT_FAILED
    print(f"verified {record.get('checked_at')}: {record.get('build_variant')} build, {record.get('tokens_decoded')} tokens decoded ({path})")
    return EXIT_OK


def _cmd_probe(args: argparse.Namespace) -> int:
    result = probe(args.model, tokens=args.tokens, threads=args.threads, gpu=args.gpu)
    print(json.dumps(result), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m setup.buildcheck", description="Prove that the installed llama-cpp-python build runs on this machine."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_check = sub.add_parser(
        "check",
        help="decode a few tokens in a child process; exit 0 if it works, 3 if the child died by a signal (rebuild without native tuning), 1 otherwise",
    )
    p_check.add_argument("--model", type=Path, default=None, help=f"model file (default: {model_mod.default_model_path()})")
    p_check.add_argument("--gpu", action="store_true", help="offload all layers (n_gpu_layers=-1) and require that the build offloads")
    p_check.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"tokens to decode (default: {DEFAULT_TOKENS})")
    p_check.add_argument("--threads", type=int, default=DEFAULT_THREADS, help=f"CPU threads (default: {DEFAULT_THREADS})")
    p_check.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help=f"seconds before the child counts as hung (default: {DEFAULT_TIMEOUT:.0f})"
    )
    p_check.add_argument("--record", type=Path, default=None, help=f"where to record the result (default: {record_path()})")
    p_check.add_argument("--no-record", action="store_true", help="do not record the result")
    p_status = sub.add_parser("status", help="say whether the recorded check vouches for the installed build, this CPU and the model")
    p_status.add_argument("--record", type=Path, default=None, help=f"the record (default: {record_path()})")
    p_status.add_argument("--gpu", action="store_true", help="require a check with GPU offload")
    p_args = sub.add_parser("cmake-args", help="print the CMAKE_ARGS for a llama-cpp-python build on this machine (never with AMX)")
    p_args.add_argument("variant", choices=VARIANTS)
    p_probe = sub.add_parser("probe", help="(the check's child) load the model, decode, print a JSON result")
    p_probe.add_argument("model", type=Path)
    p_probe.add_argument("--tokens", type=int, default=DEFAULT_TOKENS)
    p_probe.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    p_probe.add_argument("--gpu", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "check":
        return _cmd_check(args)
    if args.command == "status":
        return _cmd_status(args)
    if args.command == "cmake-args":
        print(cmake_args(args.variant))
        return EXIT_OK
    return _cmd_probe(args)


if __name__ == "__main__":
    sys.exit(main())
