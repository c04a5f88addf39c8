"""`aiosfs mcp MOUNTPOINT`: the mount as an MCP (Model Context Protocol) server.

MCP hosts (IDEs, desktop assistants) list and create agents, ask them, read their
conversations, write and search their memory and run the mount's tools, through
the official SDK. Like `aiosfs aios-api`, it is a client of the mount's files, as
the user who runs it: what that user may not do through the files, they may not
do here. docs/mcp.md lists the tools and resources.

    host  --stdio or streamable HTTP-->  serve.py (trio; hypercorn for HTTP)
                                         server.py (the tools and resources, MCPServer)
                                         operations.py (what each does in the mount)
"""
