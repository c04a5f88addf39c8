"""Rewrite a GGUF model file with another list of layers, byte for byte.

The GPU check must travel in 64 MiB, and the embedded model alone is 98 MB. So the
bundle carries the model's first layers only (``reshape(src, dst, range(k))``), and the
machine that runs the check writes them back out to the full depth, layer ``i`` taken
from kept layer ``i % k`` (``expand``): the same tensor shapes and weight formats in the
same number of layers as the shipped file, so a step costs on the device what the
shipped model's step costs, while its answers are no longer the shipped model's.

Only the header is parsed (key/values and tensor infos); tensor data is copied as it
is, each tensor with the padding that followed it, so alignment is kept.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUF value types -> struct format of one scalar; 8 is a string, 9 an array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
COPY_CHUNK = 1 << 22


class GGUFError(Exception):
    """Not a GGUF file this module can rewrite."""


@dataclass
class Tensor:
    name: str
    dims: list[int]
    ggml_type: int
    offset: int  # from the start of the data section
    span: int = 0  # bytes up to the next tensor (or the end of the file): data and its padding


@dataclass
class Header:
    version: int
    kv: list[tuple[str, int, bytes]]  # key, value type, the value's raw bytes
    tensors: list[Tensor]
    alignment: int
    data_start: int

    def value(self, key: str) -> int | str | None:
        for k, vtype, raw in self.kv:
            if k == key:
                if vtype == _STRING:
                    return raw[8:].decode()
                if vtype in _SCALARS:
                    return struct.unpack(_SCALARS[vtype], raw)[0]
        return None

    @property
    def arch(self) -> str:
        return str(self.value("general.architecture") or "llama")

    @property
    def block_count(self) -> int:
        count = self.value(f"{self.arch}.block_count")
        if not isinstance(count, int):
            raise GGUFError(f"no {self.arch}.block_count in the file")
        return count


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise GGUFError("the file ends inside its header")
    return data


def _u32(f: BinaryIO) -> int:
    return int(struct.unpack("<I", _read(f, 4))[0])


def _u64(f: BinaryIO) -> int:
    return int(struct.unpack("<Q", _read(f, 8))[0])


def _string(f: BinaryIO) -> bytes:
    n = _u64(f)
    return struct.pack("<Q", n) + _read(f, n)


def _value(f: BinaryIO, vtype: int) -> bytes:
    """A value's raw bytes as stored (strings and arrays with their lengths)."""
    if vtype in _SCALARS:
        return _read(f, struct.calcsize(_SCALARS[vtype]))
    if vtype == _STRING:
        return _string(f)
    if vtype == _ARRAY:
        etype, n = _u32(f), _u64(f)
        head = struct.pack("<IQ", etype, n)
        if etype in _SCALARS:
            return head + _read(f, n * struct.calcsize(_SCALARS[etype]))
        return head + b"".join(_value(f, etype) for _ in range(n))
    raise GGUFError(f"unknown GGUF value type {vtype}")


def read_header(path: Path) -> Header:
    with path.open("rb") as f:
        if f.read(4) != MAGIC:
            raise GGUFError(f"{path} is not a GGUF file")
        version = _u32(f)
        if version < 2:
            raise GGUFError(f"GGUF version {version} is too old")
        n_tensors, n_kv = _u64(f), _u64(f)
        kv = []
        for _ in range(n_kv):
            key = _string(f)[8:].decode()
            vtype = _u32(f)
            kv.append((key, vtype, _value(f, vtype)))
        tensors = []
        for _ in range(n_tensors):
            name = _string(f)[8:].decode()
            dims = [_u64(f) for _ in range(_u32(f))]
            tensors.append(Tensor(name, dims, _u32(f), _u64(f)))
        header = Header(version, kv, tensors, DEFAULT_ALIGNMENT, 0)
        alignment = header.value("general.alignment")
        header.alignment = alignment if isinstance(alignment, int) and alignment > 0 else DEFAULT_ALIGNMENT
        header.data_start = -(-f.tell() // header.alignment) * header.alignment
    data_bytes = path.stat().st_size - header.data_start
    ordered = sorted(tensors, key=lambda t: t.offset)
    for t, nxt in zip(ordered, [*ordered[1:], None], strict=True):
        t.span = (nxt.offset if nxt else data_bytes) - t.offset
        if t.span < 0 or t.span % header.alignment:
            raise GGUFError(f"{path}: tensor {t.name} is not followed by aligned data ({t.span} bytes)")
    return header


def _pack_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def reshape(src: Path, dst: Path, layers: Sequence[int]) -> Header:
    """Write `dst`: `src` with layer ``i`` taken from `src`'s layer ``layers[i]``; the header written."""
    header = read_header(src)
    n_old = header.block_count
    if not layers or any(not 0 <= i < n_old for i in layers):
        raise GGUFError(f"layers must be a non-empty list of indices below {n_old}")
    count_key = f"{header.arch}.block_count"
    kv = []
    for key, vtype, raw in header.kv:
        if key == count_key:
            raw = struct.pack(_SCALARS[vtype], len(layers))
        elif vtype == _ARRAY and key.startswith(header.arch + ".") and struct.unpack("<Q", raw[4:12])[0] == n_old:
            raise GGUFError(f"{key} holds a value per layer: rewriting it is not supported")
        kv.append((key, vtype, raw))
    by_layer: dict[int, list[tuple[str, Tensor]]] = {}
    for t in header.tensors:
        if m := _LAYER.match(t.name):
            by_layer.setdefault(int(m.group(1)), []).append((m.group(2), t))
    plan: list[tuple[str, Tensor]] = []  # the file's order: the layers where its first layer was
    for t in header.tensors:
        if not _LAYER.match(t.name):
            plan.append((t.name, t))
        elif not any(_LAYER.match(name) for name, _ in plan):
            plan += [(f"blk.{new}.{suffix}", lt) for new, old in enumerate(layers) for suffix, lt in by_layer.get(old, [])]
    head = bytearray(MAGIC + struct.pack("<IQQ", header.version, len(plan), len(kv)))
    for key, vtype, raw in kv:
        head += _pack_string(key) + struct.pack("<I", vtype) + raw
    offset = 0
    placed: list[tuple[Tensor, int]] = []
    for name, t in plan:
        head += _pack_string(name) + struct.pack("<I", len(t.dims)) + b"".join(struct.pack("<Q", d) for d in t.dims)
        head += struct.pack("<IQ", t.ggml_type, offset)
        placed.append((t, offset))
        offset += -(-t.span // header.alignment) * header.alignment
    head += b"\0" * (-len(head) % header.alignment)
    tmp = dst.with_name(dst.name + ".tmp")
    with src.open("rb") as fin, tmp.open("wb") as fout:
        fout.write(head)
        for t, at in placed:
            fin.seek(header.data_start + t.offset)
            left = t.span
            while left:
                chunk = fin.read(min(left, COPY_CHUNK))
                if not chunk:
                    raise GGUFError(f"{src} ends inside tensor {t.name}")
                fout.write(chunk)
                left -= len(chunk)
            fout.write(b"\0" * (len(head) + at + -(-t.span // header.alignment) * header.alignment - fout.tell()))
    tmp.replace(dst)
    return read_header(dst)


def keep_first(src: Path, dst: Path, k: int) -> Header:
    """`src`'s first `k` layers only."""
    return reshape(src, dst, list(range(k)))


def expand(src: Path, dst: Path, n_layers: int) -> Header:
    """`n_layers` layers, layer ``i`` taken from `src`'s layer ``i % k`` (k: the layers `src` has)."""
    k = read_header(src).block_count
    return reshape(src, dst, [i % k for i in range(n_layers)])


def layer_bytes(header: Header) -> tuple[int, int]:
    """(bytes outside the layers, bytes of the largest layer): what a file of k layers takes."""
    fixed = 0
    per: dict[int, int] = {}
    for t in header.tensors:
        m = _LAYER.match(t.name)
        if m:
            per[int(m.group(1))] = per.get(int(m.group(1)), 0) + t.span
        else:
            fixed += t.span
    return header.data_start + fixed, max(per.values(), default=0)
