"""A small MCP server for the tests of MCP servers as tools (tests/test_mcp_tools.py),
made with the SDK's MCPServer (FastMCP in the SDK's 1.x).

    python mcp_tools_server.py                       over stdio
    python mcp_tools_server.py --http PORT --token T streamable HTTP on 127.0.0.1:PORT/mcp;
                                               requests must carry "Authorization: Bearer T"

Tools: `sleep` (seconds, then its pid), `pid`, `calls` (how many calls of its
tools it has run, this one included), `fail` (an error result), `picture` (an
image and a text), `Odd.Name` (a name that is no file name as it is), `grow` and
`shrink` (add and remove the tool `grown`, and say that the tools changed).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import anyio
from mcp.server.mcpserver import Context, Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ImageContent, TextContent

# a 1x1 PNG
PIXEL = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d49444154789c6360000002000100e221bc330000000049454e44ae426082"
)

server = MCPServer("aiosfs-test")
ran = 0  # calls of its tools, `calls` included


def counted() -> None:
    global ran
    ran += 1


@server.tool()
async def sleep(seconds: float) -> str:
    """Sleep for some seconds, then say which process slept."""
    counted()
    await anyio.sleep(seconds)
    return f"slept in {os.getpid()}"


@server.tool()
def pid() -> int:
    """The server's process id."""
    counted()
    return os.getpid()


@server.tool()
def calls() -> int:
    """How many calls of this server's tools ran, this one included."""
    counted()
    return ran


@server.tool()
def fail(message: str) -> str:
    """Always fails with the message."""
    counted()
    raise ToolError(message)


@server.tool(structured_output=False)
def picture() -> list[Any]:
    """An image and a caption."""
    image: ImageContent = Image(data=PIXEL, format="png").to_image_content()
    return [image, TextContent(type="text", text="one pixel")]


@server.tool(name="Odd.Name")
def odd_name() -> str:
    """A tool whose MCP name has a dot."""
    return "odd"


def grown() -> str:
    """A tool that `grow` added."""
    counted()
    return "grown"


@server.tool()
async def grow(ctx: Context) -> str:
    """Add the tool `grown`."""
    counted()
    if "grown" not in {tool.name for tool in await server.list_tools()}:
        server.add_tool(grown, name="grown")
    await ctx.session.send_tool_list_changed()
    return "grew"


@server.tool()
async def shrink(ctx: Context) -> str:
    """Remove the tool `grown`."""
    counted()
    server.remove_tool("grown")
    await ctx.session.send_tool_list_changed()
    return "shrank"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", type=int, default=0, help="serve streamable HTTP on this port instead of stdio")
    parser.add_argument("--token", default="", help="the bearer token HTTP requests must carry")
    args = parser.parse_args()
    if not args.http:
        server.run()
        return
    import uvicorn

    app = server.streamable_http_app()

    async def checked(scope: Any, receive: Any, send: Any) -> None:
        """Refuse (401) an HTTP request without the token."""
        if scope["type"] == "http" and (b"authorization", f"Bearer {args.token}".encode()) not in scope["headers"]:
            await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"bad token"})
            return
        await app(scope, receive, send)

    uvicorn.run(checked, host="127.0.0.1", port=args.http, log_level="warning", lifespan="on")


if __name__ == "__main__":
    main()
