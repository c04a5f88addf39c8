"""The checks of what a caller writes, each in one place: the syscall handlers and
the filesystem's write-time checks both call these."""

from __future__ import annotations

import codecs
import errno

from .. import params
from ..errors import KernelError
from ..text import loads as loads


def request_size(size: int, what: str = "the request") -> None:
    """EFBIG for a request (prompt, call turn, recall query) over MAX_REQUEST_BYTES."""
    if size > params.MAX_REQUEST_BYTES:
        raise KernelError(errno.EFBIG, f"{what} is {size} bytes; the limit is {params.MAX_REQUEST_BYTES}")


def stored_size(size: int, what: str, limit: int = params.MAX_CONFIG_BYTES) -> None:
    """EFBIG for a whole-file write (config, permissions, context…) over its limit."""
    if size > limit:
        raise KernelError(errno.EFBIG, f"{what} is over {limit} bytes")


def text(data: bytes | str, what: str, final: bool = True) -> str:
    """The UTF-8 text of a write; EINVAL names the first bad byte. Not `final`: the
    start of a text still being written, whose last character may be incomplete."""
    if isinstance(data, str):
        return data
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(data, final=final)
    except UnicodeDecodeError as exc:
        raise KernelError(errno.EINVAL, f"{what}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); send UTF-8 text") from None


def lines_from(data: bytes, first: int, what: str) -> str:
    """The text of `data` from its line `first` on, behind first - 1 empty lines, so
    that a parser that names a bad line by its number names it as in the whole file."""
    return "\n" * (first - 1) + text(data, what).split("\n", first - 1)[-1]


def agent_name(name: str) -> None:
    """Agent names are directory names: no '/', NUL, '.' or '..', at most 255 bytes."""
    size = len(name.encode("utf-8", errors="surrogateescape"))
    if size > params.MAX_NAME_BYTES:
        raise KernelError(errno.ENAMETOOLONG, f"agent names are at most {params.MAX_NAME_BYTES} bytes")
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise KernelError(errno.EINVAL, f"{name!r} is not a valid agent name")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise KernelError(errno.EINVAL, "agent names must be valid UTF-8") from None
