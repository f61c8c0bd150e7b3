"""Test helpers: a real uvicorn server on loopback in a thread, and small HTTP/metrics utilities."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
import redis
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from app.caps import CapConfig
from app.httpserver import server_config
from app.main import create_app
from app.settings import Settings
from app.state import AppState
from app.workers.supervisor import WorkerSpec


@dataclass
class RunningGateway:
    url: str
    state: AppState
    server: uvicorn.Server

    @property
    def base(self) -> str:
        return self.url + "/v1"


@contextlib.contextmanager
def run_gateway(settings: Settings, *, worker_specs: Sequence[WorkerSpec] = (), wait_ready: bool = True,
                ready_timeout: float = 240.0, before_start: Callable[[AppState], None] | None = None,
                preset_caps: Mapping[str, CapConfig] | None = None, **server_overrides: Any
                ) -> Iterator[RunningGateway]:
    """create_app(settings) served by uvicorn on 127.0.0.1:<free port> in a background thread. ``before_start``
    may tune the app's state (e.g. the supervisor's backoff) before the lifespan starts anything;
    ``server_overrides`` go to uvicorn's Config (e.g. ``http="httptools"``: uvicorn's own protocol)."""
    app = create_app(settings.model_copy(update={"port": 0}), worker_specs=worker_specs, preset_caps=preset_caps)
    if before_start is not None:
        before_start(app.state.tokengate)
    config = server_config(app, settings.model_copy(update={"host": "127.0.0.1", "port": 0}),
                           log_level="warning", access_log=False, timeout_graceful_shutdown=5, **server_overrides)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="gateway", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("gateway did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    gw = RunningGateway(f"http://127.0.0.1:{port}", app.state.tokengate, server)
    if wait_ready:
        wait_until(lambda: httpx.get(gw.url + "/readyz").status_code == 200, ready_timeout, "gateway ready")
    try:
        yield gw
    finally:
        server.should_exit = True
        thread.join(timeout=60)


@dataclass
class GatewayProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path  # its stdout and stderr, until the context ends

    @property
    def base(self) -> str:
        return self.url + "/v1"

    def in_flight(self) -> float:
        return metric_sum(scrape(self.url + "/metrics"), "tokengate_requests_in_flight")


@contextlib.contextmanager
def gateway_process(*args: str, env: dict[str, str] | None = None, ready_timeout: float = 240.0
                    ) -> Iterator[GatewayProcess]:
    """`tokengate serve ARGS` as its own process (the CLI, and no GIL shared with the test) on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.NamedTemporaryFile(prefix="tokengate-gw-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port), *args],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                            start_new_session=True)
    gw = GatewayProcess(f"http://127.0.0.1:{port}", proc, Path(log.name))
    try:
        try:
            wait_until(lambda: proc.poll() is None and httpx.get(gw.url + "/readyz").status_code == 200,
                       ready_timeout, "gateway process ready")
        except AssertionError:
            raise AssertionError(Path(log.name).read_text(errors="replace")[-3000:]) from None
        yield gw
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        os.unlink(log.name)


def open_request(url: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None, *,
                 recv_buffer: int | None = None) -> socket.socket:
    """Send one POST over a raw socket and return the socket, unread: the caller decides exactly when the
    client goes away (``close()``) — unlike HTTP clients, which may leave a timed-out socket to the GC. A small
    ``recv_buffer`` keeps the server from handing the whole answer to the kernel before the client reads it."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    data = orjson.dumps(body)
    head = [f"POST {path} HTTP/1.1", f"host: {parts.hostname}:{parts.port}", "content-type: application/json",
            f"content-length: {len(data)}"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if recv_buffer is None:
        sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)  # before connect: sets the window
        sock.settimeout(10)
        sock.connect((parts.hostname, parts.port))
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    return sock


def read_response(sock: socket.socket, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response with a Content-Length off a socket from ``open_request``: status, headers, body."""
    sock.settimeout(timeout)
    raw = b""
    while b"\r\n\r\n" not in raw:
        data = sock.recv(65536)
        assert data, f"connection closed before a response head: {raw!r}"
        raw += data
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:]))
    length = int(headers["content-length"])
    while len(body) < length:
        data = sock.recv(65536)
        assert data, f"connection closed {length - len(body)} bytes before the body's end"
        body += data
    return int(lines[0].split()[1]), headers, body


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last!r})")


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """All samples of a Prometheus endpoint as {(name, sorted labels): value}."""
    text = httpx.get(url, headers=headers or {}, timeout=10).text
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def metric_sum(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    total = 0.0
    for (sname, slabels), value in samples.items():
        if sname != name:
            continue
        d = dict(slabels)
        if all(d.get(k) == v for k, v in labels.items()):
            total += value
    return total


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A real redis-server on a free loopback port, no persistence; yields its URL."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed: run scripts/install-system-deps.sh")
    for _ in range(5):
        port = free_port()
        proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        client.close()
        if proc.poll() is None:
            break
        proc.communicate()  # the port was taken meanwhile: try another
    else:
        pytest.fail("could not start redis-server")
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
