"""`aiosfs aios-api MOUNTPOINT`: the AIOS kernel's HTTP protocol, served through the mount.

Agents written for the AIOS kernel (the Cerebrum SDK's `/query` calls) run against
aiosfs unchanged: this gateway turns each query into file operations on a mounted
aiosfs, as the user who runs it, so the kernel's scheduling, batching, access control,
memory and tools apply as they do to any other agent. docs/aios.md maps every call.

    client  --HTTP-->  server.py (ASGI on trio, hypercorn)
                       queries.py (llm, memory, storage, tool → what to do in the mount)
                       responses.py (the bodies the SDK reads back)
                       ../mountclient.py (the files: agents/NAME/call, memory/, tools/NAME, ...)
"""
