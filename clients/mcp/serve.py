"""`aiosfs mcp MOUNTPOINT`: the server on stdio, or on streamable HTTP with `--listen`.

Both run on trio. Over stdio the host owns the process: the server ends when its
stdin closes (or on a signal, at once). Over HTTP it is hypercorn serving the SDK's
Starlette application at /mcp, behind the bearer token of `--token FILE` when one
is given (required off loopback: clients/httpauth.py, the rule of `aios-api` too);
it stops on SIGINT or SIGTERM.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

import trio
from starlette.types import ASGIApp, Receive, Scope, Send

from ..httpauth import bearer_matches, guard
from ..mountclient import MountClient
from .operations import Operations
from .server import AiosfsServer, build

log = logging.getLogger("aiosfs.mcp")

COMMAND = "aiosfs mcp"
PATH = "/mcp"  # where the HTTP transport answers


def serve(mountpoint: Path, listen: str | None, token_file: Path | None, timeout: float) -> int:
    """Serve until stdin closes (stdio) or a signal (HTTP); 0 then."""
    token = guard(listen, token_file, COMMAND) if listen is not None else None
    client = MountClient(mountpoint)
    try:
        client.check()
    except OSError as exc:
        raise SystemExit(f"{COMMAND}: {mountpoint} is not a live aiosfs mount ({exc.strerror}); mount it with `aiosfs mount {mountpoint}`") from None
    server = build(Operations(client, timeout))
    if listen is None:
        # A blocked read of stdin cannot be cancelled: a signal ends the process at once
        # (open files close, which cancels their turns), as hosts expect of stdio servers.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        sys.stderr.write(f"{COMMAND}: serving {mountpoint} on stdio\n")
        sys.stderr.flush()
        trio.run(server.run_stdio_async)
        return 0
    trio.run(_serve_http, server, mountpoint, listen, token)
    return 0


async def _serve_http(server: AiosfsServer, mountpoint: Path, listen: str, token: str | None) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    # For a loopback host the SDK also refuses requests whose Host or Origin header is not
    # loopback (DNS rebinding); elsewhere the token guards the port.
    host = listen.rsplit(":", 1)[0].strip("[]")
    app: ASGIApp = server.streamable_http_app(streamable_http_path=PATH, host=host)
    if token is not None:
        app = _guarded(app, token)
    config = Config()
    config.bind = [listen]
    config.accesslog = None
    config.errorlog = log
    config.graceful_timeout = 1.0
    stopped = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, stopped)
        sys.stderr.write(f"{COMMAND}: serving {mountpoint} on http://{listen}{PATH} (MCP, streamable HTTP)\n")
        sys.stderr.flush()
        await hypercorn_serve(app, config, shutdown_trigger=stopped.wait)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()


def _guarded(app: ASGIApp, token: str) -> ASGIApp:
    """`app` behind `Authorization: Bearer TOKEN`: any other HTTP request gets 401."""

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not bearer_matches(scope.get("headers") or [], token):
            body = json.dumps({"detail": "a bearer token is required: Authorization: Bearer <the token of --token FILE>"}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"www-authenticate", b"Bearer")]
            await send({"type": "http.response.start", "status": 401, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await app(scope, receive, send)

    return guarded


async def _stop_on_signal(stopped: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            stopped.set()
            return
