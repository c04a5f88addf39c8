"""A remote LLM core: jobs answered by an OpenAI-compatible server (vLLM, llama.cpp's
llama-server, `python -m llama_cpp.server`), behind the same interface as `Engine`.

Unlike the engine there is no thread: everything runs on the trio thread. Waiting jobs
are ordered by the same scheduler objects as the engine's; at most `max_in_flight`
requests run at once, and the server batches them. Each running job is one trio task
doing a streaming chat completion, whose deltas are handed to `on_update` as they
arrive, in the engine's `Delivery` tuples.

What a remote core cannot do: switch a running request out. So the policies' preemption
and holding are not applied (they only order the queue), and a paused running job keeps
its request: its stream is still read, but its output and its end are held until it is
resumed.

Errors: connect errors, a dropped connection and HTTP 5xx/408/429 are retried with
exponential backoff while nothing was published, then the job fails with EIO and the
server's message; other 4xx fail at once with EINVAL; `timeout` seconds without any
progress fail with ETIMEDOUT. The API key is sent as a bearer token and never appears
in a log line, a job's message or the statistics.
"""

from __future__ import annotations

import errno
import json
import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from .. import params
from ..llm.jobs import Job, JobState
from ..types import Delivery, Discard, Sender
from .backends import BackendInfo
from .remote_config import RemoteConfig as RemoteConfig
from .remote_config import load_api_key as load_api_key
from .scheduler import Queue, Scheduler

log = logging.getLogger(__name__)

CANCELLED = "cancelled"
INTERNAL_ERROR = "internal error in the remote core (see the aiosfs log)"


class _Failure(Exception):
    """How one attempt ended when it did not end well."""

    def __init__(self, code: int, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


class _Joiner:
    """Text to publish from the deltas, with a character split between two deltas held.

    JSON writes a character outside the BMP as two `\\u` escapes, which a server may put
    in two events; the first half is held for the second, the way the engine holds an
    incomplete UTF-8 sequence. A half that never finds its pair becomes U+FFFD.
    """

    def __init__(self) -> None:
        self._held = ""

    def feed(self, text: str) -> str:
        text, self._held = self._held + text, ""
        if text and "\ud800" <= text[-1] <= "\udbff":
            text, self._held = text[:-1], text[-1]
        return _valid(text)

    def flush(self) -> str:
        text, self._held = self._held, ""
        return _valid(text)


def _valid(text: str) -> str:
    """Pairs of surrogates joined into their character; lone ones replaced."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


@dataclass(eq=False)
class _Request:
    """A job while its request runs."""

    job: Job
    admitted: float  # trio clock: time to first byte is counted from here
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    text: _Joiner = field(default_factory=_Joiner)
    read: bool = False  # some output came: a retry would repeat it
    deltas: int = 0  # content deltas: the token count when the server sends no usage
    usage: int | None = None  # completion_tokens from the server's usage
    prompt_tokens: int = 0
    finish_reason: str | None = None
    done: bool = False  # `data: [DONE]` came in this attempt
    failure: _Failure | None = None  # a bad event came in this attempt: the rest is drained
    held: bytearray = field(default_factory=bytearray)  # output read while the job is paused
    held_tokens: int = 0


class RemoteEngine:
    """An LLM core on a remote server, with `Engine`'s interface (see the module doc)."""

    def __init__(self, config: RemoteConfig, scheduler: Scheduler, results: Sender | None = None) -> None:
        """Raises ValueError when the API key the config names cannot be had."""
        self.config = config
        self.queue = Queue(scheduler, wake=self._dispatch)  # the way in, on the trio thread
        self.results: Sender = results or Discard()  # the way back: the core set's results channel
        self._key = load_api_key(config)
        if self._key is not None and urlsplit(config.base_url).scheme == "http" and not _is_loopback(config.base_url):
            log.warning("remote core %s: the API key goes to %s in clear text (http)", config.name, config.base_url)
        self._running: dict[Job, _Request] = {}
        self._resumed = trio.Event()  # replaced at every pause change: held jobs look again
        self._nursery: trio.Nursery | None = None
        self._client: httpx.AsyncClient | None = None
        self._stopping = False
        self.stats: dict[str, float] = dict.fromkeys(
            ["requests", "retries", "errors", "timeouts", "cancelled", "jobs_done", "generated", "prompt_tokens", "ttfb_s", "ttfb_count"], 0
        )

    @property
    def info(self) -> BackendInfo:
        """What kernel/models shows of this core; 0 where the server does not say."""
        c = self.config
        return BackendInfo(c.name, "openai", c.base_url, "remote", 0, 0, c.max_in_flight, 0, 0)

    # -- the engine's interface ----------------------------------------------------------
    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the queue until `stop()`; requests still running then are dropped
        without a delivery, as the engine drops its slots (the kernel fails their jobs)."""
        if self._stopping:
            task_status.started()
            return
        size = self.config.max_in_flight
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        # no proxy or .netrc from the environment: requests go where configured, with only our credentials
        async with httpx.AsyncClient(timeout=None, limits=limits, trust_env=False) as client:
            self._client = client
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    task_status.started()
                    self._dispatch()
                    await trio.sleep_forever()
            finally:
                self._nursery = None
                self._client = None

    def stop(self) -> None:
        self._stopping = True
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    @property
    def scheduler(self) -> Scheduler:
        return self.queue.scheduler

    def cancel(self, job: Job) -> bool:
        """Cancel a job; True when it was waiting and is now finished. A running one
        ends through its delivery once its request is cancelled."""
        if self.queue.take(job):
            job.finish(JobState.CANCELLED, errno.ECANCELED, "cancelled while queued")
            return True
        job.cancel_requested = True
        request = self._running.get(job)
        if request is not None:
            request.scope.cancel()
        return False

    def pause(self, job: Job, paused: bool) -> None:
        """Take a waiting job out of the queue (or put it back). A running one keeps its
        request (a server cannot switch it out) and its output is held until resumed."""
        self.queue.park(job, paused)
        request = self._running.get(job)
        if request is not None and not paused:
            self._release_held(request)
        self._resumed.set()
        self._resumed = trio.Event()

    def running(self) -> int:
        return sum(1 for request in self._running.values() if not request.job.pause_requested)

    def statistics(self) -> dict[str, Any]:
        """`requests` counts jobs sent (HTTP attempts are requests + retries); time to first
        byte runs from admission, so it includes connecting, retries and the server's queue."""
        s = self.stats
        out: dict[str, Any] = {k: int(v) for k, v in s.items() if k not in ("ttfb_s", "ttfb_count")}
        out["mean_ttfb_ms"] = round(1000 * s["ttfb_s"] / s["ttfb_count"], 1) if s["ttfb_count"] else 0.0
        out["in_flight"] = len(self._running)
        out["running"] = self.running()
        out["queued"] = len(self.queue.scheduler) + len(self.queue.parked)
        return out

    # -- admission -------------------------------------------------------------------------
    def _dispatch(self) -> None:
        """Start waiting jobs while fewer than `max_in_flight` requests run."""
        if self._nursery is None or self._stopping:
            return
        free = self.config.max_in_flight - len(self._running)
        if free <= 0 or not len(self.queue.scheduler):
            return
        for job in self.queue.scheduler.pick(free):
            request = _Request(job, trio.current_time())
            self._running[job] = request
            self._nursery.start_soon(self._serve, request)

    async def _serve(self, request: _Request) -> None:
        """One job from admission to its end delivery."""
        job = request.job
        try:
            self._hand_over([(job, b"", 0, None)])  # running from now on
            self.stats["requests"] += 1
            end: Delivery | None = None
            with request.scope:
                rest, tokens, outcome = await self._generate(request)
                await self._until_resumed(job)  # a paused job shows nothing new, its end included
                end = (job, bytes(request.held) + rest, request.held_tokens + tokens, outcome)
            if end is None:  # its scope was cancelled: only `cancel` does that
                self.stats["cancelled"] += 1
                end = (job, b"", 0, (JobState.CANCELLED, errno.ECANCELED, CANCELLED))
            self._hand_over([end])
        except Exception:
            log.exception("remote core %s: request of job %d failed", self.config.name, job.id)
            self.stats["errors"] += 1
            self._hand_over([(job, b"", 0, (JobState.ERROR, errno.EIO, INTERNAL_ERROR))])
        finally:
            del self._running[job]
            self._dispatch()

    async def _until_resumed(self, job: Job) -> None:
        while job.pause_requested:
            await self._resumed.wait()

    def _hand_over(self, deliveries: list[Delivery]) -> None:
        try:
            self.results.send_nowait(deliveries)
        except Exception:  # a closed channel (the kernel stops) must not take every other request down
            log.exception("remote core %s: its results could not be sent", self.config.name)

    # -- one request, with its retries -------------------------------------------------------
    async def _generate(self, request: _Request) -> tuple[bytes, int, tuple[JobState, int, str]]:
        """Attempts until one ends the job: (last bytes, token correction, end)."""
        retries = 0
        while True:
            try:
                await self._attempt(request)
                return self._done(request)
            except _Failure as failure:
                if not failure.retryable or request.read or retries >= self.config.retries:
                    return self._failed(request, failure, retries)
            retries += 1
            self.stats["retries"] += 1
            await trio.sleep(self.config.backoff * 2 ** (retries - 1))

    def _done(self, request: _Request) -> tuple[bytes, int, tuple[JobState, int, str]]:
        # the server's own count wins over the deltas counted while streaming
        correction = request.usage - request.deltas if request.usage is not None else 0
        self.stats["generated"] += correction
        self.stats["prompt_tokens"] += request.prompt_tokens
        self.stats["jobs_done"] += 1
        return request.text.flush().encode(), correction, (JobState.DONE, 0, "")

    def _failed(self, request: _Request, failure: _Failure, retries: int) -> tuple[bytes, int, tuple[JobState, int, str]]:
        self.stats["timeouts" if failure.code == errno.ETIMEDOUT else "errors"] += 1
        message = failure.message + (f" (after {retries} retries)" if retries else "")
        return request.text.flush().encode(), 0, (JobState.ERROR, failure.code, self._redact(message))

    def _redact(self, text: str) -> str:
        """Some servers quote the key they refused; it must not reach a job's message."""
        return text.replace(self._key, "[api key]") if self._key else text

    async def _attempt(self, request: _Request) -> None:
        """One HTTP request; returns when the answer is complete, else raises _Failure."""
        assert self._client is not None
        request.done, request.failure = False, None
        timeout = self.config.timeout
        # a deadline pushed back at every line: a long answer is fine, silence is not
        with trio.move_on_after(timeout) as watchdog:
            try:
                async with self._client.stream("POST", self.config.endpoint, json=self._body(request.job), headers=self._headers()) as response:
                    await self._check_response(response)
                    await self._read_events(request, response, watchdog)
                return
            except httpx.TransportError as exc:  # refused, reset, dropped: the server may come back
                raise _Failure(errno.EIO, self._transport_message(exc), retryable=True) from None
            except httpx.HTTPError as exc:  # e.g. a body that does not decode: another try would not help
                raise _Failure(errno.EIO, f"bad answer from {self.config.name}: {type(exc).__name__}: {exc}", retryable=False) from None
        if request.failure is not None:  # it came while the rest of the stream was drained
            raise request.failure
        if not request.done:
            raise _Failure(errno.ETIMEDOUT, f"{self.config.name} made no progress for {timeout:g} s", retryable=False)

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream"}
        if self._key is not None:
            headers["Authorization"] = f"Bearer {self._key}"
        return headers

    def _body(self, job: Job) -> dict[str, Any]:
        c = job.config
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": job.messages,
            "stream": True,
            "stream_options": {"include_usage": True},  # servers that know it send the token counts
            "max_tokens": c.max_tokens,
            "temperature": c.temperature,
            "top_p": c.top_p,
        }
        if c.seed >= 0:
            body["seed"] = c.seed
        if c.stop:
            body["stop"] = list(c.stop)
        if c.ignore_eos:
            body["ignore_eos"] = True  # llama.cpp and vLLM extension
        if job.grammar is not None:
            body["grammar"] = job.grammar  # llama.cpp servers' GBNF extension
        return body

    def _transport_message(self, exc: httpx.TransportError) -> str:
        detail = f"{type(exc).__name__}: {exc}".rstrip(": ")
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return f"cannot reach {self.config.name} at {self.config.base_url}: {detail}"
        return f"the connection to {self.config.name} failed: {detail}"

    async def _check_response(self, response: httpx.Response) -> None:
        """Raise the failure an HTTP status or a non-stream answer means."""
        code = response.status_code
        if code == 200:
            kind = response.headers.get("content-type", "")
            if not kind.startswith("text/event-stream"):
                raise _Failure(errno.EIO, f"{self.config.name} answered {kind or 'no content type'}, not a stream of events", retryable=False)
            return
        where = f"HTTP {code} from {self.config.name}: {await _error_message(response)}"
        if code >= 500 or code in (408, 429):  # the server's trouble, or "try later": worth another attempt
            raise _Failure(errno.EIO, where, retryable=True)
        raise _Failure(errno.EINVAL if 400 <= code < 500 else errno.EIO, where, retryable=False)

    async def _read_events(self, request: _Request, response: httpx.Response, watchdog: trio.CancelScope) -> None:
        """Publish the deltas of a server-sent event stream until `data: [DONE]`; each
        event is one `data:` line, as OpenAI-compatible servers send them.

        The loop body never awaits and never leaves the loop: httpx's nested async
        generators must end by running out or by an exception from their inside (a
        cancellation), else trio warns that they were abandoned. So after [DONE] or a
        bad event the rest is drained, with the deadline no longer pushed back.
        """
        async for line in response.aiter_lines():
            if request.done or request.failure is not None:
                continue
            watchdog.deadline = trio.current_time() + self.config.timeout
            if not line.startswith("data:"):
                continue  # comments (keep-alives), event names, blank separators
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                request.done = True
                continue
            try:
                self._take_event(request, _parse_event(data, self.config.name))
            except _Failure as failure:
                request.failure = failure
        if request.failure is not None:
            raise request.failure
        if not request.done and request.finish_reason is None:
            raise _Failure(errno.EIO, f"{self.config.name} ended the stream before the answer was complete", retryable=False)

    def _take_event(self, request: _Request, event: dict[str, Any]) -> None:
        if "error" in event:
            raise _Failure(errno.EIO, f"{self.config.name} reported an error: {_describe_error(event)}", retryable=False)
        usage = event.get("usage")
        if isinstance(usage, dict):
            if isinstance(usage.get("completion_tokens"), int):
                request.usage = usage["completion_tokens"]
            if isinstance(usage.get("prompt_tokens"), int):
                request.prompt_tokens = usage["prompt_tokens"]
        choices = event.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str) and content:
                self._publish(request, content)
            if choice.get("finish_reason"):
                request.finish_reason = str(choice["finish_reason"])

    def _publish(self, request: _Request, content: str) -> None:
        """Hand a delta over, or hold it while the job is paused."""
        request.deltas += 1
        self.stats["generated"] += 1
        if not request.read:
            request.read = True
            self.stats["ttfb_s"] += trio.current_time() - request.admitted
            self.stats["ttfb_count"] += 1
        request.held += request.text.feed(content).encode()
        request.held_tokens += 1
        if not request.job.pause_requested:
            self._release_held(request)

    def _release_held(self, request: _Request) -> None:
        if request.held or request.held_tokens:
            chunk, tokens = bytes(request.held), request.held_tokens
            request.held.clear()
            request.held_tokens = 0
            self._hand_over([(request.job, chunk, tokens, None)])


def _parse_event(data: str, name: str) -> dict[str, Any]:
    try:
        event = json.loads(data)
    except json.JSONDecodeError:
        event = None
    if not isinstance(event, dict):
        raise _Failure(errno.EIO, f"{name} sent an event that is not a JSON object: {_cut(data)}", retryable=False)
    return event


async def _error_message(response: httpx.Response) -> str:
    """The message of an error response: OpenAI's `{"error": {"message"}}` and its kin."""
    body = bytearray()
    async for chunk in response.aiter_bytes():  # read to the end: see _read_events on leaving early
        if len(body) < params.REMOTE_ERROR_BODY_BYTES:
            body += chunk
    text = body[: params.REMOTE_ERROR_BODY_BYTES].decode("utf-8", "replace")
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        return _cut(text.strip()) or response.reason_phrase or "(no message)"
    return _describe_error(parsed) if isinstance(parsed, dict) else _cut(text)


def _describe_error(obj: dict[str, Any]) -> str:
    """`{"error": {"message": ...}}` (OpenAI, vLLM, llama.cpp), `{"error": "..."}`, or
    FastAPI's `{"detail": ...}`; any other object as JSON."""
    error = obj.get("error")
    if isinstance(error, dict):
        text = error.get("message") or error.get("detail") or error
    elif isinstance(error, str) and error:
        text = error
    else:
        text = obj.get("message") or obj.get("detail") or obj
    return _cut(text if isinstance(text, str) else json.dumps(text))


def _cut(text: str) -> str:
    text = " ".join(text.split())  # one line: a job's message is one line of `error`
    limit = params.REMOTE_ERROR_CHARS
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")
