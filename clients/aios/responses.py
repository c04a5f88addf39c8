"""The AIOS kernel's response bodies, as its SDK reads them: an envelope around a
response of one class (llm, tool, memory, storage), an errno turned into an HTTP-like
status code in band."""

from __future__ import annotations

import errno
from typing import Any

from ..mountclient import FileError

STATUS = {
    errno.EINVAL: 400,
    errno.E2BIG: 400,
    errno.ENAMETOOLONG: 400,
    errno.EISDIR: 400,
    errno.ENOTDIR: 400,
    errno.ELOOP: 400,
    errno.EXDEV: 400,
    errno.EPERM: 403,
    errno.EACCES: 403,
    errno.ENOENT: 404,
    errno.EEXIST: 409,
    errno.ENOTEMPTY: 409,
    errno.EFBIG: 413,
    errno.EAGAIN: 429,
    errno.EDQUOT: 429,
    errno.ENOSPC: 507,
    errno.ETIMEDOUT: 504,
}


def status_code(exc: FileError) -> int:
    return STATUS.get(exc.errno, 500)


def enveloped(response: dict[str, Any]) -> dict[str, Any]:
    """The AIOS kernel's response envelope; its timing lists are empty unless it preempted."""
    return {"response": response, "start_times": [], "end_times": [], "waiting_times": [], "turnaround_times": []}


def llm_response(message: str | None = None, tool_calls: list[dict[str, Any]] | None = None, exc: FileError | None = None) -> dict[str, Any]:
    return {
        "response_class": "llm",
        "response_message": message,
        "tool_calls": tool_calls,
        "finished": True,
        "error": None if exc is None else str(exc),
        "status_code": 200 if exc is None else status_code(exc),
    }


def tool_response(message: str, exc: FileError | None = None) -> dict[str, Any]:
    return {
        "response_class": "tool",
        "response_message": message,
        "finished": exc is None,
        "error": None if exc is None else str(exc),
        "status_code": 200 if exc is None else status_code(exc),
    }


def memory_response(success: bool = True, error: str | None = None, **fields: Any) -> dict[str, Any]:
    return (
        {"response_class": "memory", "memory_id": None, "content": None, "metadata": None, "search_results": None}
        | fields
        | {
            "success": success,
            "error": error,
        }
    )


def storage_response(message: str, exc: FileError | None = None) -> dict[str, Any]:
    return {
        "response_class": "storage",
        "response_message": message,
        "finished": True,
        "error": None if exc is None else str(exc),
        "status_code": 200 if exc is None else status_code(exc),
    }
