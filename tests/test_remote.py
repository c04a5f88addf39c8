"""The remote LLM core against a real `python -m llama_cpp.server` on loopback with the
embedded model, and against tiny real HTTP servers for what a healthy server never does
(silence, error statuses, split characters, a recorded Authorization header)."""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from kernel_helpers import finished, producing, run

from kernel.agents.config import AgentConfig
from kernel.cores.engine import Delivery
from kernel.cores.remote import RemoteConfig, RemoteEngine
from kernel.cores.scheduler import Scheduler
from kernel.llm.jobs import Job, JobState
from setup.model import shipped_model_path

TIMEOUT = 120  # seconds a test body may take on a busy machine before it fails instead of hanging
SERVER_EXTRAS = ("uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")


# -- driving a RemoteEngine ------------------------------------------------------------------


class Recorder:
    """The results channel of a core: applies deliveries as the kernel does and keeps them, timed."""

    def __init__(self) -> None:
        self.log: list[tuple[float, Job, bytes, int, tuple[JobState, int, str] | None]] = []

    def send_nowait(self, deliveries: list[Delivery]) -> None:
        for job, chunk, n_tokens, end in deliveries:
            self.log.append((time.monotonic(), job, chunk, n_tokens, end))
            if chunk or n_tokens:
                job.publish(chunk, n_tokens)
            else:
                job.mark_running()
            if end is not None:
                job.finish(*end)

    def of(self, job: Job) -> list[tuple[float, bytes, int, tuple[JobState, int, str] | None]]:
        return [(t, chunk, n, end) for t, j, chunk, n, end in self.log if j is job]

    def index(self, job: Job, ending: bool) -> int:
        """Where the job's first delivery (or its end) is in the whole log."""
        return next(i for i, (_, j, _, _, end) in enumerate(self.log) if j is job and (end is not None) == ending)


def make_engine(base_url: str, **options: Any) -> tuple[RemoteEngine, Recorder]:
    options.setdefault("retries", 0)
    recorder = Recorder()
    engine = RemoteEngine(RemoteConfig(options.pop("name", "remote"), base_url, options.pop("model", "smollm2"), **options), Scheduler(), recorder)
    return engine, recorder


def make_job(n: int, prompt: str, **config: Any) -> Job:
    config.setdefault("temperature", 0.0)
    return Job(n, "agent", 1000, prompt, [{"role": "user", "content": prompt}], [], AgentConfig(**config))


@contextlib.asynccontextmanager
async def running(engine: RemoteEngine) -> AsyncIterator[RemoteEngine]:
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        try:
            yield engine
        finally:
            engine.stop()


def drive(engine: RemoteEngine, body: Callable[[], Awaitable[Any]], timeout: float = TIMEOUT) -> Any:
    async def main() -> Any:
        async with running(engine):
            return await body()

    return run(main, timeout)


async def ask(engine: RemoteEngine, job: Job) -> Job:
    engine.queue.push(job)
    return await finished(job)


# -- a real llama_cpp.server -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """`python -m llama_cpp.server` with the embedded model on a fixed loopback port."""

    def __init__(self, model: Path, log: Path) -> None:
        self.model, self.log = model, log
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> None:
        argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model), "--n_threads", "2", "--n_ctx", "1024"]
        argv += ["--interrupt_requests", "False", "--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode}; see {self.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama_cpp.server was not ready in {timeout:.0f} s; see {self.log}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            return httpx.get(self.base_url + "/v1/models", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    missing = [name for name in SERVER_EXTRAS if importlib.util.find_spec(name) is None]
    if missing:
        pytest.fail(f"llama_cpp.server needs {', '.join(missing)}: run scripts/setup (it installs llama-cpp-python[server])")
    model = shipped_model_path()  # the shipped weights on every machine (see conftest.model)
    if not model.is_file():
        pytest.fail(f"the embedded model is not installed at {model}: run scripts/setup")
    server = LlamaServer(model, tmp_path_factory.mktemp("llama") / "server.log")
    try:
        yield server
    finally:
        server.kill(signal.SIGTERM)


@pytest.fixture
def server(llama_server: LlamaServer) -> LlamaServer:
    """The module's server, started again if a test killed it."""
    if not llama_server.alive:
        llama_server.start()
    return llama_server


# -- tiny real HTTP servers for what llama_cpp.server does not do ------------------------------

Reply = Callable[[trio.SocketStream], Awaitable[None]]


def status(code: int, body: Any) -> Reply:
    async def reply(stream: trio.SocketStream) -> None:
        data = json.dumps(body).encode()
        head = f"HTTP/1.1 {code} Status\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        await stream.send_all(head.encode() + data)

    return reply


def sse(*events: Any, gap: float = 0.0, then_hang: bool = False) -> Reply:
    """A 200 event stream; str events are sent as the raw JSON of a `data:` line."""

    async def reply(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        for event in events:
            data = event if isinstance(event, str) else json.dumps(event)
            await stream.send_all(f"data: {data}\n\n".encode())
            await trio.sleep(gap)
        if then_hang:
            await trio.sleep_forever()

    return reply


def delta(text: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


def finish(reason: str = "stop") -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}


def answer(*pieces: str, usage: dict[str, int] | None = None, gap: float = 0.0) -> Reply:
    events: list[Any] = [delta(p) for p in pieces] + [finish()]
    if usage is not None:
        events.append({"choices": [], "usage": usage})
    return sse(*events, "[DONE]", gap=gap)


class TinyServer:
    """A real HTTP/1.1 server on loopback: request N gets replies[N] (the last one repeats);
    it records each request's headers and JSON body."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = replies
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, nursery: trio.Nursery) -> None:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]

    async def _handle(self, stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async with stream:
                headers, body = await self._read_request(stream)
                self.requests.append((headers, body))
                await self.replies[min(len(self.requests), len(self.replies)) - 1](stream)

    @staticmethod
    async def _read_request(stream: trio.SocketStream) -> tuple[dict[str, str], dict[str, Any]]:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        fields = [line.split(":", 1) for line in head.decode().split("\r\n")[1:]]
        headers = {name.strip().lower(): value.strip() for name, value in fields}
        while len(body) < int(headers.get("content-length", "0")):
            body += await stream.receive_some(65536)
        return headers, json.loads(body)


def drive_tiny(tiny: TinyServer, body: Callable[[RemoteEngine], Awaitable[Any]], **options: Any) -> tuple[RemoteEngine, Recorder, Any]:
    """Run `body(engine)` with an engine named "tiny" pointed at `tiny`, on one trio run."""
    made: list[tuple[RemoteEngine, Recorder]] = []

    async def main() -> Any:
        async with trio.open_nursery() as nursery:
            await tiny.start(nursery)
            made.append(make_engine(tiny.base_url, name="tiny", **options))
            async with running(made[0][0]):
                result = await body(made[0][0])
            nursery.cancel_scope.cancel()
        return result

    result = run(main, TIMEOUT)
    return made[0][0], made[0][1], result


# -- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": "has space"}, "name"),
        ({"name": ""}, "name"),
        ({"base_url": "ftp://host"}, "http"),
        ({"base_url": "http://"}, "no host"),
        ({"base_url": "http://user:secret@host:8000"}, "credentials"),
        ({"base_url": "http://host:8000/?x=1"}, "query"),
        ({"base_url": "http://host:99999"}, "port"),
        ({"model": " "}, "model"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"max_in_flight": True}, "max_in_flight"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
        ({"retries": -1}, "retries"),
        ({"backoff": -0.1}, "backoff"),
        ({"api_key_env": "KEY", "api_key_file": "/k"}, "not both"),
        ({"api_key_env": "1BAD"}, "api_key_env"),
    ],
)
def test_config_refuses_bad_values(changes: dict[str, Any], message: str) -> None:
    values: dict[str, Any] = {"name": "gpu-1", "base_url": "http://127.0.0.1:8000", "model": "m"} | changes
    with pytest.raises(ValueError, match=message):
        RemoteConfig(**values)


def test_config_normalizes_the_base_url_and_info_describes_the_core() -> None:
    config = RemoteConfig("gpu-1", "https://example.org:8443/v1/", "meta/llama", max_in_flight=4)
    assert config.base_url == "https://example.org:8443"
    assert config.endpoint == "https://example.org:8443/v1/chat/completions"
    info = RemoteEngine(config, Scheduler()).info
    assert (info.name, info.backend, info.device, info.path, info.n_slots) == ("gpu-1", "openai", "remote", "https://example.org:8443", 4)


def test_api_key_file_must_not_be_world_readable(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sk-file-secret\n")
    key_file.chmod(0o644)
    config = RemoteConfig("k", "http://127.0.0.1:1", "m", api_key_file=str(key_file))
    with pytest.raises(ValueError, match="readable by everyone") as refused:
        RemoteEngine(config, Scheduler())
    assert "sk-file-secret" not in str(refused.value)
    key_file.chmod(0o600)
    RemoteEngine(config, Scheduler())  # accepted now
    missing = RemoteConfig("k", "http://127.0.0.1:1", "m", api_key_env="AIOSFS_TEST_NO_SUCH_KEY")
    with pytest.raises(ValueError, match="not set"):
        RemoteEngine(missing, Scheduler())


# -- against the real server ---------------------------------------------------------------------


@pytest.mark.model
def test_an_answer_is_streamed_as_it_is_generated(server: LlamaServer) -> None:
    engine, recorder = make_engine(server.base_url)
    job = make_job(1, "Count from 1 to 100, separated by spaces.", max_tokens=32)
    drive(engine, lambda: ask(engine, job))

    assert job.state is JobState.DONE, job.message
    deliveries = recorder.of(job)
    assert deliveries[0][1:] == (b"", 0, None)  # running before any output
    content = [d for d in deliveries if d[1]]
    end_time = deliveries[-1][0]
    assert len(content) >= 2 and all(end is None for _, _, _, end in content)
    assert content[0][0] < end_time and job.first_token_at <= job.finished_at  # the first bytes came before the end
    assert b"".join(chunk for _, chunk, _, _ in deliveries) == bytes(job.data)
    # llama_cpp.server sends no usage: one token per delta
    assert 0 < job.n_generated <= 32 and job.n_generated == sum(n for _, _, n, _ in deliveries)
    stats = engine.statistics()
    assert stats["requests"] == stats["jobs_done"] == 1 and stats["generated"] == job.n_generated
    assert stats["mean_ttfb_ms"] > 0 and stats["errors"] == stats["retries"] == stats["in_flight"] == 0


@pytest.mark.model
def test_max_in_flight_one_runs_jobs_one_after_the_other(server: LlamaServer) -> None:
    engine, recorder = make_engine(server.base_url, max_in_flight=1)
    first, second = make_job(1, "Name three colors.", max_tokens=24), make_job(2, "Name three animals.", max_tokens=24)

    async def body() -> None:
        engine.queue.push(first)
        engine.queue.push(second)
        await producing(first)
        assert engine.queue.queued() == [second] and engine.running() == 1
        assert second.state is JobState.QUEUED and engine.statistics()["in_flight"] == 1
        await finished(first)
        await finished(second)

    drive(engine, body)
    assert first.state is second.state is JobState.DONE
    assert recorder.index(first, ending=True) < recorder.index(second, ending=False)  # started after the first ended
    assert second.started_at >= first.finished_at


@pytest.mark.model
def test_cancel_of_a_running_job_ends_it_and_the_next_one_runs(server: LlamaServer) -> None:
    engine, _ = make_engine(server.base_url, max_in_flight=1)
    long = make_job(1, "Write a long story about a dragon who learns to cook.", max_tokens=400)
    nxt, dropped = make_job(2, "Say hello.", max_tokens=8), make_job(3, "Say bye.", max_tokens=8)

    async def body() -> None:
        for job in (long, nxt, dropped):
            engine.queue.push(job)
        await producing(long)
        assert engine.cancel(dropped) is True  # waiting: finished at once
        assert engine.cancel(long) is False  # running: ends through its delivery
        await finished(long)
        await finished(nxt)

    drive(engine, body)
    assert (long.state, long.errno, long.message) == (JobState.CANCELLED, errno.ECANCELED, "cancelled")
    assert long.data and long.n_generated < 400
    assert (dropped.state, dropped.errno) == (JobState.CANCELLED, errno.ECANCELED)
    assert nxt.state is JobState.DONE and nxt.data
    stats = engine.statistics()
    assert stats["cancelled"] == 1 and stats["requests"] == 2 and stats["jobs_done"] == 1


@pytest.mark.model
def test_a_killed_server_fails_the_job_with_eio_after_retries_and_a_restart_serves_again(server: LlamaServer) -> None:
    engine, _ = make_engine(server.base_url, retries=2, backoff=0.05)
    before, during, after = (make_job(i, "Say hello.", max_tokens=8) for i in (1, 2, 3))

    async def body() -> None:
        await ask(engine, before)  # leaves a kept-alive connection in the pool
        server.kill()
        await ask(engine, during)
        await trio.to_thread.run_sync(server.start)
        await ask(engine, after)

    drive(engine, body)
    assert before.state is JobState.DONE and after.state is JobState.DONE and after.data
    assert (during.state, during.errno) == (JobState.ERROR, errno.EIO)
    assert "remote" in during.message and during.message.endswith("(after 2 retries)"), during.message
    stats = engine.statistics()
    assert stats["retries"] == 2 and stats["errors"] == 1 and stats["jobs_done"] == 2


@pytest.mark.model
def test_http_4xx_from_the_real_server_is_einval_with_its_message(server: LlamaServer) -> None:
    engine, _ = make_engine(server.base_url + "/no/such/api", retries=3, backoff=0.05)
    job = make_job(1, "Say hello.", max_tokens=8)
    drive(engine, lambda: ask(engine, job))
    assert (job.state, job.errno) == (JobState.ERROR, errno.EINVAL)
    assert job.message == "HTTP 404 from remote: Not Found"
    assert engine.statistics()["retries"] == 0  # a refused request is not tried again


@pytest.mark.model
def test_a_stream_that_ends_before_the_answer_is_eio(server: LlamaServer) -> None:
    # llama_cpp.server answers 200 to a prompt over its window, then ends the stream empty
    engine, _ = make_engine(server.base_url)
    job = make_job(1, "word " * 1500, max_tokens=8)
    drive(engine, lambda: ask(engine, job))
    assert (job.state, job.errno) == (JobState.ERROR, errno.EIO)
    assert "ended the stream before the answer was complete" in job.message


# -- against tiny servers ------------------------------------------------------------------------


def test_a_silent_server_times_out() -> None:
    listener = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        engine, _ = make_engine(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=1.0, retries=2)
        job = make_job(1, "hello")

        async def body() -> float:
            started = trio.current_time()
            await ask(engine, job)
            return trio.current_time() - started

        elapsed = drive(engine, body)
    finally:
        listener.close()
    assert (job.state, job.errno) == (JobState.ERROR, errno.ETIMEDOUT)
    assert job.message == "remote made no progress for 1 s"
    assert elapsed >= 1.0
    stats = engine.statistics()
    assert stats["timeouts"] == 1 and stats["retries"] == 0 and stats["errors"] == 0


def test_a_stream_that_stalls_times_out_and_keeps_what_it_said() -> None:
    tiny = TinyServer(sse(delta("Hel"), delta("lo"), then_hang=True))
    job = make_job(1, "hello")
    drive_tiny(tiny, lambda engine: ask(engine, job), timeout=1.0)
    assert (job.state, job.errno) == (JobState.ERROR, errno.ETIMEDOUT)
    assert job.text == "Hello" and job.n_generated == 2


def test_4xx_is_einval_with_the_servers_message_and_not_retried() -> None:
    tiny = TinyServer(status(400, {"error": {"message": "max_tokens is too large", "type": "invalid_request_error"}}))
    job = make_job(1, "hello")
    engine, _, _ = drive_tiny(tiny, lambda engine: ask(engine, job), retries=3, backoff=0.01)
    assert (job.state, job.errno, job.message) == (JobState.ERROR, errno.EINVAL, "HTTP 400 from tiny: max_tokens is too large")
    assert len(tiny.requests) == 1


def test_5xx_is_retried_with_backoff_then_eio_with_the_servers_message() -> None:
    tiny = TinyServer(status(500, {"error": {"message": "CUDA out of memory"}}))
    job = make_job(1, "hello")
    engine, _, _ = drive_tiny(tiny, lambda engine: ask(engine, job), retries=2, backoff=0.01)
    assert (job.state, job.errno) == (JobState.ERROR, errno.EIO)
    assert job.message == "HTTP 500 from tiny: CUDA out of memory (after 2 retries)"
    assert len(tiny.requests) == 3 and engine.statistics()["retries"] == 2


def test_a_retry_succeeds_and_the_servers_usage_counts_the_tokens() -> None:
    tiny = TinyServer(status(503, {"error": "loading"}), answer("Hel", "lo", usage={"prompt_tokens": 7, "completion_tokens": 5}))
    job = make_job(1, "hello", max_tokens=9, seed=42, stop=["\n\n"], top_p=0.5)
    engine, _, _ = drive_tiny(tiny, lambda engine: ask(engine, job), retries=1, backoff=0.01)
    assert job.state is JobState.DONE and job.text == "Hello"
    assert job.n_generated == 5  # the server's count, not the two deltas
    stats = engine.statistics()
    assert stats["generated"] == 5 and stats["prompt_tokens"] == 7 and stats["retries"] == 1
    _, sent = tiny.requests[-1]
    assert sent["messages"] == [{"role": "user", "content": "hello"}] and sent["model"] == "smollm2"
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"], sent["seed"], sent["stop"]) == (9, 0.0, 0.5, 42, ["\n\n"])


def test_a_character_split_between_two_events_is_held_until_whole() -> None:
    # json.dumps writes U+1F600 as two \u escapes; a server may send them in two events
    high, low = json.dumps(delta("\ud83d")), json.dumps(delta("\ude00"))
    assert "\\ud83d" in high  # sent as the escape, as a server would
    tiny = TinyServer(sse(high, low, delta("!"), high, finish(), "[DONE]"))  # the last half never finds its pair
    job = make_job(1, "hello")
    drive_tiny(tiny, lambda engine: ask(engine, job))
    assert job.state is JobState.DONE
    assert job.data == "\U0001f600!\ufffd".encode()


def test_an_error_event_in_the_stream_is_eio() -> None:
    tiny = TinyServer(sse(delta("partial "), {"error": {"message": "the engine died", "code": 500}}))
    job = make_job(1, "hello")
    engine, _, _ = drive_tiny(tiny, lambda engine: ask(engine, job), retries=3, backoff=0.01)
    assert (job.state, job.errno, job.message) == (JobState.ERROR, errno.EIO, "tiny reported an error: the engine died")
    assert job.text == "partial " and len(tiny.requests) == 1  # output went out: never retried


def test_api_key_from_env_reaches_the_server_and_is_never_shown(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    key = "sk-test-0123456789"
    monkeypatch.setenv("AIOSFS_TEST_KEY", key)
    tiny = TinyServer(answer("ok"), status(401, {"error": {"message": f"Incorrect API key provided: {key}."}}))
    good, refused = make_job(1, "hello"), make_job(2, "hello")

    async def body(engine: RemoteEngine) -> None:
        await ask(engine, good)
        await ask(engine, refused)

    engine, recorder, _ = drive_tiny(tiny, body, api_key_env="AIOSFS_TEST_KEY")
    assert [headers["authorization"] for headers, _ in tiny.requests] == [f"Bearer {key}"] * 2
    assert good.state is JobState.DONE and good.text == "ok"
    assert (refused.state, refused.errno) == (JobState.ERROR, errno.EINVAL)
    assert refused.message == "HTTP 401 from tiny: Incorrect API key provided: [api key]."
    shown = [good.message, refused.message, refused.error_line(), repr(engine.statistics()), repr(engine.config), repr(recorder.log), caplog.text]
    assert not any(key in text for text in shown)


def test_pause_holds_a_running_jobs_output_and_parks_a_waiting_one() -> None:
    stream = answer(*[f"{i} " for i in range(10)], gap=0.05)
    sent = trio.Event()

    async def stream_then_say_so(socket: trio.SocketStream) -> None:
        await stream(socket)
        sent.set()

    tiny = TinyServer(stream_then_say_so)
    first, second = make_job(1, "count"), make_job(2, "count")

    async def body(engine: RemoteEngine) -> None:
        engine.queue.push(first)
        engine.queue.push(second)
        engine.pause(second, True)  # waiting: leaves the queue
        await producing(first)
        engine.pause(first, True)
        assert engine.running() == 0 and engine.queue.queued() == [second]
        shown = len(first.data)
        await sent.wait()  # the server has sent the whole answer,
        await trio.testing.wait_all_tasks_blocked(0.05)  # and the engine has read all it could: none of it is shown
        assert len(first.data) == shown and not first.state.finished
        engine.pause(first, False)
        await finished(first)
        assert second.state is JobState.QUEUED  # still parked
        engine.pause(second, False)
        await finished(second)

    drive_tiny(tiny, body, max_in_flight=1)
    expected = "".join(f"{i} " for i in range(10))
    assert first.state is second.state is JobState.DONE
    assert first.text == second.text == expected and first.n_generated == 10


def test_stop_drops_running_requests_without_delivering_an_end() -> None:
    tiny = TinyServer(sse(delta("Hel"), then_hang=True))
    job = make_job(1, "hello")

    async def body(engine: RemoteEngine) -> None:
        engine.queue.push(job)
        await producing(job)
        engine.stop()

    engine, recorder, _ = drive_tiny(tiny, body)
    assert job.state is JobState.RUNNING and job.text == "Hel"  # the kernel fails what is left
    assert all(end is None for _, _, _, end in recorder.of(job))
