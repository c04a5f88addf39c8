"""The HTTP side: an ASGI application served by hypercorn on trio.

    POST /query            {"query_type", "agent_name", "query_data"} → queries.py
    GET  /core/llms/list   {"status": "success", "llms": [{"name", "backend"}]} from kernel/models
    GET  /status           {"status": "ok"} while the mount answers

Errors that are the query's own (a refused prompt, a missing memory) come back with
HTTP 200 in the body, as the AIOS kernel sends them: its SDK raises on anything else.
A body that is not a query is 422 {"detail": ...} (as the AIOS kernel's validation
answers), a body over MAX_BODY_BYTES 413, a missing or wrong token 401, and a bug
500: none of them stops the server.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from ..httpauth import bearer_matches, guard
from ..mountclient import FileError, MountClient
from .queries import BadQuery, Queries

log = logging.getLogger("aiosfs.aios")

MAX_BODY_BYTES = 4 * 1024 * 1024  # a query: a long conversation fits; the kernel's own limits apply after
QUERY_TYPES = ("llm", "memory", "storage", "tool")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class HTTPError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class Gateway:
    """The ASGI application."""

    def __init__(self, client: MountClient, token: str | None = None) -> None:
        self.client = client
        self.queries = Queries(client)
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            self._authorize(scope)
            body = await self._route(scope, receive)
            status = 200
        except HTTPError as exc:
            status, body = exc.status, {"detail": exc.detail}
        except ClientGone:
            return
        except Exception as exc:  # a bug answers 500 and the server goes on
            log.exception("internal error serving %s %s", scope.get("method"), scope.get("path"))
            status, body = 500, {"detail": f"internal error in the gateway: {type(exc).__name__}: {exc}"}
        await _respond(send, status, body)

    def _authorize(self, scope: Scope) -> None:
        if self.token is None:
            return
        if not bearer_matches(scope.get("headers") or [], self.token):
            raise HTTPError(401, "a bearer token is required: Authorization: Bearer <the token of --token FILE>")

    async def _route(self, scope: Scope, receive: Receive) -> Any:
        method, path = scope["method"], scope["path"].rstrip("/") or "/"
        routes: dict[str, tuple[str, Callable[[], Awaitable[Any]]]] = {
            "/status": ("GET", self._status),
            "/core/llms/list": ("GET", self._llms),
            "/query": ("POST", lambda: self._query(receive, scope)),
        }
        if path not in routes:
            raise HTTPError(404, f"no such endpoint: {path} (POST /query, GET /core/llms/list, GET /status)")
        want, handler = routes[path]
        if method != want:
            raise HTTPError(405, f"{path} takes {want}, not {method}")
        return await handler()

    async def _status(self) -> Any:
        try:
            await self.client.run(self.client.check)
        except FileError as exc:
            raise HTTPError(503, f"the mount at {self.client.root} does not answer: {exc}") from None
        return {"status": "ok"}

    async def _llms(self) -> Any:
        return {"status": "success", "llms": [{"name": name, "backend": backend} for name, backend in await self.client.models()]}

    async def _query(self, receive: Receive, scope: Scope) -> Any:
        """Answer a query; a client that goes away cancels it (its model turn included)."""
        query = _parse(await _body(receive, scope))
        answer: list[Any] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
                answer.append(await self.queries.handle(query["query_type"], query["agent_name"], query["query_data"]))
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise _only(group) from None
        except BadQuery as exc:
            raise HTTPError(422, str(exc)) from None
        if not answer:
            raise ClientGone()
        return answer[0]


class ClientGone(Exception):
    """The client disconnected before its answer: there is nobody to send it to."""


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    """After the body, an ASGI `receive` waits for the client to go away."""
    while (await receive())["type"] != "http.disconnect":
        pass
    log.info("the client went away: its query is cancelled")
    scope.cancel()


def _only(group: BaseExceptionGroup) -> BaseException:
    """The one exception a nursery wrapped (a BadQuery becomes HTTP 422)."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return HTTPError(422, str(exc)) if isinstance(exc, BadQuery) else exc


def _parse(body: bytes) -> dict[str, Any]:
    try:
        query = json.loads(body)
    except ValueError as exc:
        raise HTTPError(422, f"the body is not JSON: {exc}") from None
    if not isinstance(query, dict):
        raise HTTPError(422, 'the body must be a JSON object {"query_type", "agent_name", "query_data"}')
    if query.get("query_type") not in QUERY_TYPES:
        raise HTTPError(422, f"query_type must be one of {', '.join(QUERY_TYPES)}, not {query.get('query_type')!r}")
    if not isinstance(query.get("agent_name"), str) or not query["agent_name"]:
        raise HTTPError(422, "agent_name must be a non-empty string")
    if not isinstance(query.get("query_data"), dict):
        raise HTTPError(422, "query_data must be an object")
    return query


async def _body(receive: Receive, scope: Scope) -> bytes:
    """The request body, refused with 413 as soon as it passes MAX_BODY_BYTES."""
    headers = dict(scope.get("headers") or [])
    declared = headers.get(b"content-length", b"0")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise HTTPError(413, f"the body is {int(declared)} bytes; a query may have at most {MAX_BODY_BYTES}")
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > MAX_BODY_BYTES:
            raise HTTPError(413, f"the body is over {MAX_BODY_BYTES} bytes, the most a query may have")
        if not message.get("more_body"):
            return bytes(body)


async def _respond(send: Send, status: int, body: Any) -> None:
    data = json.dumps(body, ensure_ascii=False).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# -- the command ---------------------------------------------------------------------------
def serve(mountpoint: Path, listen: str, token_file: Path | None) -> int:
    """Serve until SIGINT or SIGTERM; 0 when stopped by one."""
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    token = guard(listen, token_file, "aiosfs aios-api")
    client = MountClient(mountpoint)
    try:
        client.check()
    except OSError as exc:
        raise SystemExit(
            f"aiosfs aios-api: {mountpoint} is not a live aiosfs mount ({exc.strerror}); mount it with `aiosfs mount {mountpoint}`"
        ) from None
    config = Config()
    config.bind = [listen]
    config.accesslog = None
    config.errorlog = log
    config.graceful_timeout = 1.0

    async def main() -> None:
        stopped = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, stopped)
            sys.stderr.write(f"aiosfs aios-api: serving {mountpoint} on http://{listen} (AIOS protocol: POST /query)\n")
            sys.stderr.flush()
            await hypercorn_serve(Gateway(client, token), config, shutdown_trigger=stopped.wait)  # type: ignore[arg-type]
            nursery.cancel_scope.cancel()

    trio.run(main)
    return 0


async def _stop_on_signal(stopped: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            stopped.set()
            return
