"""The peers: each runs one cell (a workload at N agents) and returns (records, start time)."""

from __future__ import annotations

from collections.abc import Callable

from ..load import Cell
from ..stats import Record
from .aios import run_aios_api
from .http import run_llama_cpp_server, run_llama_server
from .inproc import run_aiosfs_inproc, run_aiosfs_noreuse
from .mount import run_aiosfs_mount
from .naive import run_naive
from .raw import run_raw_batched

RUNNERS: dict[str, Callable[[Cell], tuple[list[Record], float]]] = {
    "raw-batched": run_raw_batched,
    "naive": run_naive,
    "llama_cpp.server": run_llama_cpp_server,
    "llama-server": run_llama_server,
    "aiosfs-inproc": run_aiosfs_inproc,
    "aiosfs-noreuse": run_aiosfs_noreuse,
    "aiosfs-mount": run_aiosfs_mount,
    "aiosfs-aios-api": run_aios_api,
}
IN_WORKER = {"raw-batched", "naive", "aiosfs-inproc", "aiosfs-noreuse"}  # run in a fresh process each (bench.worker)
