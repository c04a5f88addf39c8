"""The aiosfs kernel: syscalls, scheduling, the LLM cores and the managers.

It knows nothing about FUSE. Userland (the filesystem in `aiosfs/`, the services
in `services/`, the benchmark) uses this public surface, the syscall table
(`kernel.syscall`: the one way in), and `kernel.params` and `kernel.errors`;
tests may reach inside. The names load on first use, so the
engine process (`python -m kernel.cores.enginehost`) imports only what it runs.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kernel.access.policy import parse_policy as parse_policy
    from kernel.agents.config import VALIDATORS as VALIDATORS
    from kernel.agents.config import escape as escape
    from kernel.agents.config import parse_config as parse_config
    from kernel.agents.context import render_context as render_context
    from kernel.cores.coreset import ROUTES as ROUTES
    from kernel.cores.enginehost import EngineDied as EngineDied
    from kernel.cores.enginehost import EngineProcess as EngineProcess
    from kernel.cores.pidfiles import end_leftover_engines as end_leftover_engines
    from kernel.cores.remote import RemoteConfig as RemoteConfig
    from kernel.cores.remote import load_api_key as load_api_key
    from kernel.cores.scheduler import make_scheduler as make_scheduler
    from kernel.cores.wire import EngineSpec as EngineSpec
    from kernel.errors import KernelError as KernelError
    from kernel.errors import errno_name as errno_name
    from kernel.kernel import Kernel as Kernel
    from kernel.llm.events import EventStream as EventStream
    from kernel.llm.jobs import Job as Job
    from kernel.llm.jobs import JobState as JobState
    from kernel.memory.store import Attr as Attr
    from kernel.memory.store import MemoryStore as MemoryStore
    from kernel.memory.store import Passage as Passage
    from kernel.metrics import metrics_registry as metrics_registry
    from kernel.storage.database import Storage as Storage
    from kernel.tools.mcpconfig import McpServerConfig as McpServerConfig
    from kernel.tools.spec import ToolSpec as ToolSpec
    from kernel.types import Agent as Agent
    from kernel.types import Caller as Caller


def _exports() -> dict[str, str]:
    """name → the module that defines it: the imports above, read from this file, so
    that the exports are listed once, for the type checker and for `__getattr__`."""
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    return {alias.asname or alias.name: str(node.module) for node in block.body if isinstance(node, ast.ImportFrom) for alias in node.names}


EXPORTS = _exports()
__all__ = sorted(EXPORTS)


def __getattr__(name: str) -> Any:
    module = EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kernel' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
