"""`aiosfs mount --metrics HOST:PORT`: kernel/metrics over HTTP, at /metrics.

Prometheus scrapes over HTTP; the file serves node_exporter's textfile collector
and anyone with a shell. prometheus_client's server answers in threads of its
own, but the kernel's tables change on the trio thread, so each scrape is
rendered there (`TrioToken.run_sync_soon`), exactly as a read of kernel/metrics
is: a scrape never sees a table halfway through a change. Before the trio loop
runs and after it ends, a scrape gets an empty page; a trio thread that does not
answer within SCRAPE_WAIT_SECONDS gets the scrape an HTTP error, not a hung thread.

Any address is accepted. The metrics hold counts, times and agent names, never a
prompt or an answer; whoever reaches the port reads them (docs/metrics.md).
The CLI checks the flag with this module, so trio and prometheus_client load only
when a server starts.
"""

from __future__ import annotations

import argparse
import socket
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import trio
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

SCRAPE_WAIT_SECONDS = 5.0  # a scrape waits this long for the trio thread to render the metrics


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` (an IPv6 host in brackets: `[::1]:9464`) as (host, port); ValueError otherwise."""
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT with a port from 1 to 65535 (for example 127.0.0.1:9464)")
    return host, int(port)


def address_argument(text: str) -> str:
    """argparse's `type` for --metrics: the text, checked."""
    try:
        parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def check_address(text: str) -> None:
    """OSError when HOST:PORT cannot be listened on now (in use, not this host's)."""
    host, port = parse_address(text)
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server binds
        probe.bind((host, port))


class MetricsServer:
    """Serves `registry` at http://HOST:PORT/metrics from a thread; OSError when it cannot
    listen. It is the collector of the registry it serves (prometheus_client's
    `Collector` is a protocol: an object with `collect`)."""

    def __init__(self, registry: CollectorRegistry, address: str) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        host, port = parse_address(address)
        self.registry = registry
        self.token: trio.lowlevel.TrioToken | None = None  # set once the trio loop runs
        served = CollectorRegistry()
        served.register(self)
        self.server, self.thread = start_http_server(port, host, registry=served)
        self.url = f"http://{address}/metrics"

    def collect(self) -> Iterable[Metric]:
        """On the server's thread: the registry's metrics, collected on the trio thread."""
        import trio

        token = self.token
        if token is None:
            return []
        done = threading.Event()
        found: list[Metric] = []

        def collect_there() -> None:
            try:
                found.extend(self.registry.collect())
            finally:
                done.set()

        try:
            token.run_sync_soon(collect_there)
        except trio.RunFinishedError:
            return []
        if not done.wait(SCRAPE_WAIT_SECONDS):  # a stalled trio thread must not hold the scraper: nothing waits without a bound
            raise TimeoutError(f"the kernel did not answer the scrape within {SCRAPE_WAIT_SECONDS:g} s")
        return found

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
