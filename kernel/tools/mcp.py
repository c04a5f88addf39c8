"""MCP servers as tools: the servers of the mount's config (`[[mcp]]`), each
supervised by an `McpServer` (kernel/tools/mcpserver.py) in the kernel's nursery,
and what kernel/ps and kernel/status say of them.

The SDK is imported only when the config names a server: a mount without one
does not pay for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

from ..types import AuditSink
from .manager import ToolManager
from .mcpconfig import McpServerConfig

if TYPE_CHECKING:
    from .mcpserver import McpServer


class McpServers:
    """The servers of the mount's config; `run` supervises them all."""

    def __init__(self, configs: Sequence[McpServerConfig], tools: ToolManager, audit: AuditSink) -> None:
        self.servers: list[McpServer] = []
        if configs:
            from .mcpserver import McpServer

            self.servers = [McpServer(config, tools, audit) for config in configs]

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for server in self.servers:
                nursery.start_soon(server.run)

    def ps_lines(self) -> list[str]:
        return [server.ps_line() for server in self.servers]

    def describe(self) -> str:
        """The part of kernel/status: ` mcp=NAME:STATE,...` (nothing without servers)."""
        if not self.servers:
            return ""
        return " mcp=" + ",".join(f"{server.name}:{server.state}" for server in self.servers)
