"""Starting and stopping server processes: llama-server and llama_cpp.server."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import ROOT
from .console import err

DEFAULT_LLAMA_SERVER = (
    Path(os.environ.get("AIOSFS_LLAMA_SERVER_CACHE", Path.home() / ".cache" / "aiosfs" / "llama-server")) / "0.3.36" / "llama-server"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server_process(argv: list[str], log: Path, ready_url: str, timeout: float = 180) -> Iterator[subprocess.Popen[bytes]]:
    """Start a server on 127.0.0.1, wait until `ready_url` answers 200, always stop it."""
    import httpx

    with open(log, "wb") as log_file:
        log_file.write((" ".join(argv) + "\n").encode())
        log_file.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{Path(argv[0]).name} exited with {proc.returncode} during start-up; see {log}")
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not become ready in {timeout:.0f} s; see {log}")
            time.sleep(0.2)
        yield proc
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen[Any], grace: float = 10) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(grace)


def find_llama_server(args: argparse.Namespace) -> tuple[Path | None, str]:
    path = args.llama_server or DEFAULT_LLAMA_SERVER
    if path.is_file() and os.access(path, os.X_OK):
        return path, ""
    if args.build and args.llama_server is None:
        err("building llama-server (scripts/build-llama-server); this takes several minutes on 2 cores")
        result = subprocess.run([str(ROOT / "scripts" / "build-llama-server")], stdout=subprocess.PIPE, text=True)
        if result.returncode == 0 and path.is_file():
            return path, ""
        return None, "llama-server: the build failed (see the output above)"
    return None, f"llama-server: no binary at {path}; build it with scripts/build-llama-server (or pass --build)"
