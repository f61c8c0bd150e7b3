"""Managed workers as real child processes: readiness, restarts, crash-loop backoff, draining on SIGTERM, no
orphans after SIGKILL, worker logs, and the embedded default on a real CPU engine.

The fake worker (bench/fakeworker.py) runs as a real child process so the supervisor meets real pids and real
signals without a 30-second engine start. For `tokengate serve` itself, a stand-in ``vllm`` package on the
workers' PYTHONPATH turns the exact vLLM command line the CLI plans into a fake worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client import CollectorRegistry

from app.cli import main as cli_main
from app.errors import NoWorkerAvailable
from app.main import create_app
from app.metrics import GatewayMetrics
from app.settings import Settings
from app.state import AppState
from app.workers.registry import Registry
from app.workers.supervisor import Supervisor, WorkerSpec, _group_alive
from bench.fakeworker import ThreadedFakeWorker

from .utils import (
    GatewayProcess,
    free_port,
    gateway_process,
    metric_sum,
    open_request,
    read_response,
    run_gateway,
    scrape,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}
FAST: dict[str, Any] = {"discovery_interval": 0.2}  # health checks every 0.2 s: transitions show up quickly
FAST_ENV = {"TOKENGATE_DISCOVERY_INTERVAL": "0.2"}  # the same for `tokengate serve`


# --- processes ----------------------------------------------------------------------------------------------------

def alive(pid: int) -> bool:
    """A live process (a zombie waiting for its reaper is dead: it runs nothing and holds no memory)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                kids = []
            out += kids
            todo += kids
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_leftovers(pids: list[int]) -> None:
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def fake_spec(name: str, log_dir: Path, *extra: str) -> WorkerSpec:
    """A managed worker whose command runs the fake worker (model "tiny")."""
    port = free_port()
    argv = (sys.executable, "-m", "bench.fakeworker", "--port", str(port), "--model", "tiny", *extra)
    return WorkerSpec(name, "local", "cpu", argv, {"PYTHONPATH": str(ROOT)}, port, "", log_dir / f"{name}.log")


def crashing_spec(name: str, log_dir: Path, stamps: Path) -> WorkerSpec:
    """A managed worker that writes when it started and exits at once with status 3."""
    script = "import sys, time; open(sys.argv[1], 'a').write(f'{time.monotonic()}\\n'); sys.exit(3)"
    port = free_port()
    return WorkerSpec(name, "local", "cpu", (sys.executable, "-c", script, str(stamps)), {}, port, "",
                      log_dir / f"{name}.log")


def tune(**attrs: float) -> Callable[[AppState], None]:
    """Supervisor timings for a test (the defaults are for real engines: 1 s backoff, 60 s to count as healthy)."""
    def apply(state: AppState) -> None:
        assert state.supervisor is not None
        for key, value in attrs.items():
            setattr(state.supervisor, key, value)
    return apply


# --- HTTP ---------------------------------------------------------------------------------------------------------

def readyz(url: str) -> dict[str, Any]:
    doc: dict[str, Any] = httpx.get(url + "/readyz", timeout=5).json()
    return doc


def entry(doc: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(w for w in doc["workers"] if w["name"] == name)
    return found


def chat(url: str, **body: Any) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json={**CHAT, "stream": False, **body}, timeout=10)


def restarts(url: str, worker: str) -> float:
    return metric_sum(scrape(url + "/metrics"), "tokengate_worker_restarts_total", worker=worker)


def worker_up(url: str, worker: str) -> float:
    return metric_sum(scrape(url + "/metrics"), "tokengate_worker_up", worker=worker)


class RawStream:
    """One HTTP/1.1 chunked response read off a raw socket and de-chunked as it arrives: shows exactly how a stream
    ended — its terminating chunk (a clean end) or the connection just closing (a truncation)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.status: int | None = None
        self.body = b""
        self.complete = False  # the terminating zero-size chunk arrived
        self.closed = False
        self._raw = b""

    def __enter__(self) -> RawStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def events(self) -> list[str]:
        return [e[len("data: "):] for e in self.body.decode().split("\n\n") if e.startswith("data: ")]

    def read_until(self, done: Callable[[RawStream], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done(self) and not self.complete and not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            self.closed = not data
            self._raw += data
            self._parse()
        return done(self)

    def _parse(self) -> None:
        if self.status is None:
            head, sep, rest = self._raw.partition(b"\r\n\r\n")
            if not sep:
                return
            self.status = int(head.split()[1])
            assert b"transfer-encoding: chunked" in head.lower(), head
            self._raw = rest
        while not self.complete:
            line, sep, rest = self._raw.partition(b"\r\n")
            if not sep:
                return
            size = int(line, 16)
            if len(rest) < size + 2:
                return
            self.body += rest[:size]
            self._raw = rest[size + 2:]
            self.complete = size == 0


# --- the stand-in vLLM for `tokengate serve` ------------------------------------------------------------------------

_FAKE_API_SERVER = '''\
"""vLLM's OpenAI server, played by the fake worker on the port and under the name the gateway planned."""
import os
import subprocess
import sys

from bench.fakeworker import main

argv = sys.argv[1:]
if os.environ.get("FAKE_ENGINE_CHILD"):  # like vLLM's EngineCore: a child in the server's process group
    # (with FAKE_SHM=NAME, holding a segment in /dev/shm mapped, as the engine's queues are)
    subprocess.Popen([sys.executable, "-c", """
import mmap, os, sys, time
if len(sys.argv) > 1:
    fd = os.open(f"/dev/shm/{sys.argv[1]}-{os.getpid()}", os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(fd, 1 << 20)
    segment = mmap.mmap(fd, 1 << 20)
time.sleep(300)
""", *([os.environ["FAKE_SHM"]] if os.environ.get("FAKE_SHM") else [])])
if os.environ.get("FAKE_CLEANUP_MARK"):  # like multiprocessing's resource tracker: once the server is gone, it
    # takes a moment to unlink what the engine left in /dev/shm, then ends (this one writes a file instead)
    subprocess.Popen([sys.executable, "-c", f"""
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
parent = {os.getpid()}
while os.getppid() == parent:
    time.sleep(0.05)
time.sleep(0.5)
open({os.environ["FAKE_CLEANUP_MARK"] + "-" + str(os.getpid())!r}, "w").write("cleaned")  # (the server's pid)
"""])
main(["--port", argv[argv.index("--port") + 1], "--model", argv[argv.index("--served-model-name") + 1],
      *os.environ.get("FAKEWORKER_ARGS", "").split()])
'''


@pytest.fixture(scope="module")
def fake_vllm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fake-vllm")
    pkg = root / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True)
    for d in (root / "vllm", root / "vllm" / "entrypoints", pkg):
        (d / "__init__.py").write_text("")
    (pkg / "api_server.py").write_text(_FAKE_API_SERVER)
    return root


def serve_fake(fake_vllm: Path, state_dir: Path, *args: str, env: tuple[str, ...] = ()
               ) -> contextlib.AbstractContextManager[GatewayProcess]:
    """`tokengate serve --model ... --preset cpu` whose planned vLLM command lines run the fake worker."""
    worker_env = [f"PYTHONPATH={fake_vllm}{os.pathsep}{ROOT}", *env]
    flags = [x for item in worker_env for x in ("--worker-env", item)]
    model = state_dir / "fake-model"  # a model directory as far as the plan looks (the fake worker loads nothing)
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text("{}")
    return gateway_process("--model", str(model), "--served-model-name", "tiny",
                           "--preset", "cpu", "--state-dir", str(state_dir), "--log-level", "warning",
                           *flags, *args, env=FAST_ENV, ready_timeout=30)


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path / "logs"


# --- readiness --------------------------------------------------------------------------------------------------

def test_ready_needs_a_real_generation_not_only_health() -> None:
    with ThreadedFakeWorker(status=500) as w, \
            run_gateway(Settings(upstream=[w.url], **FAST), wait_ready=False) as gw:
        name = w.url.split("://", 1)[1]
        # /health and /v1/models answer 200 all along; every probe is a real generation, and each one fails
        assert w.wait_for(lambda s: s.failed >= 3, 10)
        r = httpx.get(gw.url + "/readyz", timeout=5)
        assert r.status_code == 503
        doc = r.json()
        assert doc["ready"] is False and doc["not_ready"] == [name]
        assert entry(doc, name)["reason"] == "1-token generation answered HTTP 500"
        assert entry(doc, name)["models"] == []  # never in rotation, so it serves nothing
        assert worker_up(gw.url, name) == 0
        r = chat(gw.url)  # the model is known (from /v1/models), its only worker can't generate: 503, not 404
        assert r.status_code == 503 and "retry-after" in r.headers, r.text

        w.options.status = None  # fixed: the next probe generates a token
        wait_until(lambda: httpx.get(gw.url + "/readyz").status_code == 200, 10, "worker ready once fixed")
        doc = readyz(gw.url)
        assert entry(doc, name)["ready"] is True and entry(doc, name)["reason"] == "ready"
        assert doc["not_ready"] == [] and worker_up(gw.url, name) == 1
        r = chat(gw.url)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_a_model_whose_worker_is_still_starting_is_503_not_404(log_dir: Path) -> None:
    port = free_port()
    starting = WorkerSpec("slow", "local", "cpu",
                          (sys.executable, "-c", "import time; time.sleep(60)", "--served-model-name", "tiny"),
                          {}, port, "", log_dir / "slow.log")
    with run_gateway(Settings(**FAST), worker_specs=[starting], wait_ready=False) as gw:
        r = chat(gw.url)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
        assert "is ready yet" in r.json()["error"]["message"]
        assert chat(gw.url, model="never-configured").status_code == 404


def test_an_unreachable_redis_fails_the_start_before_any_worker_is_launched(log_dir: Path, tmp_path: Path) -> None:
    stamps = tmp_path / "started"
    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0", connect_timeout=0.5),
                     worker_specs=[crashing_spec("w", log_dir, stamps)])

    async def start() -> None:
        async with app.router.lifespan_context(app):
            pytest.fail("the gateway started without its Redis")

    with pytest.raises(NoWorkerAvailable, match="rate limiter unavailable"):
        asyncio.run(start())
    time.sleep(0.5)  # a worker launched would have written its stamp by now
    assert not stamps.exists()


# --- restarts -----------------------------------------------------------------------------------------------------

def test_kill_9_takes_a_worker_out_of_rotation_and_it_comes_back_with_a_new_pid(log_dir: Path) -> None:
    specs = [fake_spec("w-a", log_dir), fake_spec("w-b", log_dir)]
    # a 3 s backoff leaves a window to look at the gap
    with run_gateway(Settings(**FAST), worker_specs=specs, ready_timeout=20,
                     before_start=tune(backoff_base=3.0)) as gw:
        wait_until(lambda: readyz(gw.url)["not_ready"] == [], 10, "both workers ready")
        old = entry(readyz(gw.url), "w-a")["pid"]
        assert isinstance(old, int) and alive(old) and restarts(gw.url, "w-a") == 0

        os.kill(old, signal.SIGKILL)
        wait_until(lambda: not entry(readyz(gw.url), "w-a")["ready"], 2, "w-a out of rotation", interval=0.02)
        a = entry(readyz(gw.url), "w-a")
        assert a["reason"] == "exited (-9), restarting" and a["pid"] is None
        assert worker_up(gw.url, "w-a") == 0
        served = [chat(gw.url) for _ in range(6)]  # meanwhile every request goes to w-b
        assert [r.status_code for r in served] == [200] * 6
        assert {r.headers["x-tokengate-worker"] for r in served} == {"w-b"}

        wait_until(lambda: entry(readyz(gw.url), "w-a")["ready"], 10, "w-a ready again")
        a = entry(readyz(gw.url), "w-a")
        assert a["pid"] != old and alive(a["pid"]) and not alive(old)
        assert a["restarts"] == 1 and restarts(gw.url, "w-a") == 1 and restarts(gw.url, "w-b") == 0
        assert worker_up(gw.url, "w-a") == 1
        served = [chat(gw.url) for _ in range(6)]
        assert all(r.status_code == 200 for r in served)
        assert "w-a" in {r.headers["x-tokengate-worker"] for r in served}  # traffic reaches it again


def test_the_healthy_period_counts_from_ready_not_from_the_start(log_dir: Path) -> None:
    """A worker that dies soon after becoming ready is in a crash loop however long it took to start (minutes, for
    a large model): counted from its start, such a worker looked healthy and its backoff never grew."""
    spec = fake_spec("slow-start", log_dir)
    spec = dataclasses.replace(spec, argv=("/bin/sh", "-c", 'sleep 2; exec "$@"', "sh", *spec.argv))
    with run_gateway(Settings(**FAST), worker_specs=[spec], wait_ready=False,
                     before_start=tune(healthy_after=1.5, backoff_base=0.1)) as gw:
        for _ in range(2):  # up 2 s + ready ~0.5 s: each run is past 1.5 s from its start, not from ready
            wait_until(lambda: entry(readyz(gw.url), "slow-start")["ready"], 20, "ready")
            pid = entry(readyz(gw.url), "slow-start")["pid"]
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: not entry(readyz(gw.url), "slow-start")["ready"], 5, "out of rotation")
        managed = gw.server.config.app.state.tokengate.supervisor.managed[0]
        # (counted from its start, each run was "healthy": 1 exit in a row, then 1 again)
        wait_until(lambda: managed.failures_in_row == 2, 10, "the second exit counted as a second in a row")
        assert len(managed.exits) == 2


def test_crash_loop_backs_off_exponentially_and_the_others_keep_serving(log_dir: Path, tmp_path: Path) -> None:
    stamps = tmp_path / "starts"
    specs = [fake_spec("good", log_dir), crashing_spec("crashy", log_dir, stamps)]
    with run_gateway(Settings(**FAST), worker_specs=specs, ready_timeout=20,
                     before_start=tune(backoff_base=0.5, backoff_max=30.0)) as gw:
        wait_until(lambda: stamps.exists() and len(stamps.read_text().split()) >= 4, 15, "four starts")
        starts = [float(t) for t in stamps.read_text().split()][:4]
        gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        # the backoff doubles: 0.5, 1, 2 s, plus the time to start and exit a Python process (never less)
        assert gaps[0] >= 0.45 and gaps[1] >= 0.95 and gaps[2] >= 1.95, gaps
        assert gaps[1] > gaps[0] + 0.2 and gaps[2] > gaps[1] + 0.4, gaps
        assert gaps[2] < 6, gaps

        wait_until(lambda: "crash loop" in entry(readyz(gw.url), "crashy")["reason"], 5, "crash loop in /readyz")
        r = httpx.get(gw.url + "/readyz", timeout=5)
        assert r.status_code == 200  # the gateway is still ready: another worker serves
        crashy = entry(r.json(), "crashy")
        assert crashy["ready"] is False and r.json()["not_ready"] == ["crashy"]
        assert crashy["restarts"] >= 3
        assert worker_up(gw.url, "crashy") == 0 and worker_up(gw.url, "good") == 1
        assert restarts(gw.url, "crashy") >= 3 and restarts(gw.url, "good") == 0
        served = [chat(gw.url) for _ in range(4)]
        assert [r.status_code for r in served] == [200] * 4
        assert {r.headers["x-tokengate-worker"] for r in served} == {"good"}
        assert (log_dir / "crashy.log").read_text().count("==== tokengate: starting crashy") >= 4


def test_a_crash_loop_of_thousands_of_exits_keeps_being_restarted(log_dir: Path) -> None:
    spec = WorkerSpec("crashy", "local", "cpu", ("/bin/false",), {}, free_port(), "", log_dir / "crashy.log")

    async def run() -> tuple[int, bool]:
        sup = Supervisor([spec], Registry(), GatewayMetrics(CollectorRegistry(), version="test"),
                         backoff_base=1e-9, backoff_max=1e-9)
        await sup.start()
        m = sup.managed[0]
        m.failures_in_row = 1100  # ~17 h of crash loop at the default backoff: 2 ** 1100 overflowed a float
        restarts = m.restarts
        await asyncio.to_thread(wait_until, lambda: m.restarts >= restarts + 3, 10, "restarts go on")
        alive = not any(t.done() for t in sup._tasks)
        await sup.stop()
        return m.failures_in_row, alive

    failures, alive = asyncio.run(run())
    assert failures > 1100 and alive


def test_stop_terms_then_kills_a_worker_that_ignores_sigterm(log_dir: Path, tmp_path: Path) -> None:
    ready = tmp_path / "ignoring"
    script = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "open(sys.argv[1], 'w').close(); time.sleep(60)")
    stubborn = WorkerSpec("stubborn", "local", "cpu", (sys.executable, "-c", script, str(ready)), {}, free_port(),
                          "", log_dir / "stubborn.log")
    polite = fake_spec("polite", log_dir)

    async def run() -> tuple[list[int], float, list[int | None]]:
        sup = Supervisor([stubborn, polite], Registry(), GatewayMetrics(CollectorRegistry(), version="test"),
                         stop_timeout=1.0)
        await sup.start()
        # both in place: the stubborn one ignores SIGTERM, the fake worker listens (its handler is installed)
        await asyncio.to_thread(wait_until, lambda: ready.exists() and httpx.get(polite.url + "/health").is_success,
                                10, "both workers up")
        pids = sup.pids()
        t0 = time.monotonic()
        await sup.stop()
        return pids, time.monotonic() - t0, [m.proc.returncode for m in sup.managed if m.proc is not None]

    pids, took, exits = asyncio.run(run())
    assert len(pids) == 2
    assert not any(alive(p) for p in pids)
    assert 1.0 <= took < 6  # waited out the stop timeout for the stubborn one, then killed it
    assert exits == [-signal.SIGKILL, 0]  # the fake worker left on SIGTERM by itself


# --- logs ---------------------------------------------------------------------------------------------------------

def test_a_worker_log_past_its_limit_is_rotated_and_the_worker_writes_on(log_dir: Path) -> None:
    """The log of a long-running engine grew without end (each health check adds access-log lines)."""
    script = ("import sys, time\n"
              "for i in range(400):\n"
              "    print(f'line {i} ' + 'x' * 90, flush=True); time.sleep(0.005)\n"
              "time.sleep(60)\n")
    spec = WorkerSpec("chatty", "local", "cpu", (sys.executable, "-c", script), {}, free_port(), "",
                      log_dir / "chatty.log")
    with run_gateway(Settings(**FAST), worker_specs=[spec], wait_ready=False,
                     before_start=tune(housekeeping_every=0.1, log_max_bytes=8192)):
        old = log_dir / "chatty.log.1"

        def both() -> bytes:
            return (old.read_bytes() if old.exists() else b"") + spec.log_path.read_bytes()

        wait_until(lambda: b"line 399 " in both(), 15, "the worker's last line")
        time.sleep(0.5)  # (a last look)
        assert 8192 < old.stat().st_size < 20_000  # rotated, each time at the limit
        assert len(both()) < 30_000  # of the ~40 KB written, what is older than the last rotation is gone
        assert b"\0" not in spec.log_path.read_bytes()  # the worker writes on at the new end, not past a hole


def test_worker_logs_go_to_files_and_the_admin_endpoint_tails_them(log_dir: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    spec = fake_spec("logged", log_dir)
    with run_gateway(Settings(**FAST), worker_specs=[spec], ready_timeout=20) as gw:
        text = spec.log_path.read_text()
        assert f"==== tokengate: starting logged: {' '.join(spec.argv)}" in text
        assert f"fakeworker listening on http://127.0.0.1:{spec.port}" in text  # the worker's own stdout

        r = httpx.get(gw.url + "/admin/workers/logged/log", params={"lines": 1}, timeout=5)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert r.text == text.splitlines(keepends=True)[-1]
        whole = httpx.get(gw.url + "/admin/workers/logged/log", params={"lines": 1000}, timeout=5).text
        assert whole == text
        missing = httpx.get(gw.url + "/admin/workers/nope/log", timeout=5)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "worker_not_found"

        # loopback only: the same app asked by a client from elsewhere
        async def from_elsewhere() -> httpx.Response:
            transport = httpx.ASGITransport(app=gw.server.config.app, client=("203.0.113.9", 4000))
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as remote:
                return await remote.get("/admin/workers/logged/log")

        denied = asyncio.run(from_elsewhere())
        assert denied.status_code == 403 and "loopback" in denied.json()["error"]["message"]

    assert cli_main(["logs", "logged", "--lines", "1", "--state-dir", str(log_dir.parent)]) == 0
    assert capsys.readouterr().out == "==> logged.log <==\n" + text.splitlines(keepends=True)[-1]


# --- `tokengate serve`: draining and dying -----------------------------------------------------------------------

def test_sigterm_drains_streams_then_stops_every_worker(fake_vllm: Path, tmp_path: Path) -> None:
    with serve_fake(fake_vllm, tmp_path, "--replicas", "2", "--drain-timeout", "3",
                    env=("FAKEWORKER_ARGS=--token-delay=0.05",)) as gw:
        doc = readyz(gw.url)
        assert [w["name"] for w in doc["workers"]] == ["local-cpu-0", "local-cpu-1"]
        workers = [w["pid"] for w in doc["workers"]]
        tree = [p for pid in workers for p in [pid, *descendants(pid)]]
        stack = contextlib.ExitStack()
        try:
            stream = {**CHAT, "stream": True}
            short = stack.enter_context(RawStream(open_request(gw.url, "/v1/chat/completions",
                                                               {**stream, "max_tokens": 20})))
            long = stack.enter_context(RawStream(open_request(gw.url, "/v1/chat/completions",
                                                              {**stream, "max_tokens": 1000})))
            for s in (short, long):
                assert s.read_until(lambda s: len(s.events()) >= 2, 10) and s.status == 200
            # and one that is not streamed (50 s), so its answer is still to come at the deadline
            unary = stack.enter_context(contextlib.closing(open_request(
                gw.url, "/v1/chat/completions", {**CHAT, "stream": False, "max_tokens": 1000})))
            wait_until(lambda: metric_sum(scrape(gw.url + "/metrics"), "tokengate_requests_in_flight") >= 3, 5,
                       "the unstreamed request in flight")

            os.kill(gw.proc.pid, signal.SIGTERM)
            t0 = time.monotonic()
            # draining at once: still listening, /readyz says 503, new requests get 503
            wait_until(lambda: httpx.get(gw.url + "/readyz").status_code == 503, 2, "/readyz 503")
            assert readyz(gw.url)["draining"] is True
            assert "draining: 3 request(s) in flight may finish (up to 3 s)" in gw.log.read_text()  # why it waits
            refused = chat(gw.url)
            assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]

            # the short stream (1 s) ends normally inside the drain window
            assert short.read_until(lambda s: s.complete, 10)
            assert short.events()[-1] == "[DONE]" and len(short.events()) == 1 + 20 + 1
            # the long one (50 s) is cut at the deadline with an in-band error, never a bare truncation
            long.read_until(lambda s: s.complete, 15)
            cut_after = time.monotonic() - t0
            assert long.complete, long.body[-300:]
            assert "[DONE]" not in long.events()
            err = orjson.loads(long.events()[-1])["error"]
            assert err["code"] == "gateway_shutdown" and set(err) == {"message", "type", "param", "code"}
            assert 2.0 <= cut_after <= 8.0
            # the unstreamed one gets OpenAI's error shape with a 503, not uvicorn's plain-text 500
            status, headers, body = read_response(unary, 10)
            assert status == 503 and headers["content-type"] == "application/json", (status, body)
            err = orjson.loads(body)["error"]
            assert err["code"] == "gateway_shutdown" and set(err) == {"message", "type", "param", "code"}

            gw.proc.wait(30)  # then the workers get TERM and the gateway exits
            wait_until(lambda: not any(alive(p) for p in tree), 5, "every worker process gone")
        finally:
            stack.close()
            kill_leftovers(tree)


def test_ctrl_c_stops_every_worker_and_exits_130_without_a_traceback(fake_vllm: Path, tmp_path: Path) -> None:
    """``make run``'s "Ctrl-C stops everything": uvicorn raises the SIGINT it handled again after the shutdown;
    the CLI ends there with the shell's code for it, not with a KeyboardInterrupt traceback that reads as a crash."""
    with serve_fake(fake_vllm, tmp_path, "--replicas", "2", "--drain-timeout", "3",
                    env=("FAKE_ENGINE_CHILD=1",)) as gw:
        workers = [w["pid"] for w in readyz(gw.url)["workers"]]
        wait_until(lambda: all(descendants(p) for p in workers), 5, "the workers' engine children")
        tree = [p for pid in workers for p in [pid, *descendants(pid)]]
        try:
            os.killpg(gw.proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole foreground process group
            assert gw.proc.wait(30) == 130
            wait_until(lambda: not any(alive(p) for p in tree), 5, "every worker process gone")
            log = gw.log.read_text(errors="replace")
            assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
        finally:
            kill_leftovers(tree)


def test_a_worker_s_own_cleanup_after_its_server_exits_is_not_cut_short(fake_vllm: Path, tmp_path: Path) -> None:
    """vLLM's engine segments in /dev/shm are unlinked by a process of the worker's group after its server has
    exited; a SIGKILL of the group right then left them behind (seen after Ctrl-C of `make run` under load)."""
    mark = tmp_path / "cleaned"
    with serve_fake(fake_vllm, tmp_path, "--replicas", "2", env=(f"FAKE_CLEANUP_MARK={mark}",)) as gw:
        workers = [w["pid"] for w in readyz(gw.url)["workers"]]
        wait_until(lambda: all(descendants(p) for p in workers), 5, "the workers' cleanup processes")
        tree = [p for pid in workers for p in [pid, *descendants(pid)]]
        try:
            os.kill(gw.proc.pid, signal.SIGTERM)
            gw.proc.wait(30)
            # each worker's cleaner (named after its server) finished
            assert sorted(p.name for p in tmp_path.glob("cleaned-*")) == sorted(f"cleaned-{p}" for p in workers)
            assert len(tree) == 4 and not any(alive(p) for p in tree)
        finally:
            kill_leftovers(tree)


def test_sigkill_of_the_gateway_leaves_no_worker_behind(fake_vllm: Path, tmp_path: Path) -> None:
    with serve_fake(fake_vllm, tmp_path, "--replicas", "2", env=("FAKE_ENGINE_CHILD=1",)) as gw:
        workers = [w["pid"] for w in readyz(gw.url)["workers"]]
        wait_until(lambda: all(descendants(p) for p in workers), 5, "the workers' engine children")
        tree = [p for pid in workers for p in [pid, *descendants(pid)]]
        assert len(tree) == 4 and all(alive(p) for p in tree)
        try:
            os.kill(gw.proc.pid, signal.SIGKILL)
            gw.proc.wait(10)
            # the servers die with their parent, and their own children (vLLM's engine core) with them
            wait_until(lambda: not any(alive(p) for p in tree), 5, "no orphaned worker process")
        finally:
            kill_leftovers(tree)


def _shm(name: str) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"{name}-*"))


def test_what_workers_left_in_dev_shm_is_removed_after_a_kill_9_and_after_the_gateway_s(fake_vllm: Path,
                                                                                          tmp_path: Path) -> None:
    """A process killed with SIGKILL unlinks nothing (nor does multiprocessing's resource tracker killed with it):
    vLLM's engine queues stayed in /dev/shm, hundreds of MiB of memory each time, until the machine restarted."""
    name = f"tg-test-{os.getpid()}-{tmp_path.name}"
    with serve_fake(fake_vllm, tmp_path, "--replicas", "2", env=("FAKE_ENGINE_CHILD=1", f"FAKE_SHM={name}")) as gw:
        workers = [w["pid"] for w in readyz(gw.url)["workers"]]
        wait_until(lambda: len(_shm(name)) == 2, 10, "each worker's engine segment")
        tree = [p for pid in workers for p in [pid, *descendants(pid)]]
        try:
            first = _shm(name)
            os.kill(workers[0], signal.SIGKILL)  # the server: the supervisor ends its group, and removes its segment
            wait_until(lambda: len(_shm(name)) == 2 and _shm(name) != first, 30, "the restarted worker's segment")
            assert len(set(first) & set(_shm(name))) == 1  # the other worker's is untouched
            tree += [p for w in readyz(gw.url)["workers"] if w["pid"] for p in [w["pid"], *descendants(w["pid"])]]
            os.kill(gw.proc.pid, signal.SIGKILL)  # the gateway: the janitor kills the groups, and removes theirs
            gw.proc.wait(10)
            wait_until(lambda: not _shm(name), 10, "no segment left in /dev/shm")
            wait_until(lambda: not any(alive(p) for p in tree), 5, "no orphaned worker process")
        finally:
            kill_leftovers(tree)
            for leftover in _shm(name):
                os.unlink(f"/dev/shm/{leftover}")


# --- the embedded default, for real -----------------------------------------------------------------------------

def test_embedded_default_serves_the_tiny_model_on_a_real_cpu_engine(tmp_path: Path) -> None:
    with gateway_process("--state-dir", str(tmp_path), "--log-level", "warning", env=FAST_ENV,
                         ready_timeout=240) as gw:
        doc = readyz(gw.url)
        assert [(w["name"], w["models"], w["managed"]) for w in doc["workers"]] == [
            ("local-cpu-0", ["tiny-llama"], True)]
        assert (tmp_path / "models" / "tiny-llama" / "config.json").exists()
        hello: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello!"}]
        with openai.OpenAI(base_url=gw.base, api_key="unused", max_retries=0, timeout=60) as client:
            chunks = list(client.chat.completions.create(model="tiny-llama", messages=hello, max_tokens=4,
                                                         stream=True))
            assert chunks[0].choices[0].delta.role == "assistant"
            assert chunks[-1].choices[0].finish_reason in ("length", "stop")
            # the gateway streams by default (README): a one-object answer is asked for explicitly
            reply = client.chat.completions.create(model="tiny-llama", messages=hello, max_tokens=4, stream=False)
            assert reply.object == "chat.completion" and isinstance(reply.choices[0].message.content, str)
            assert reply.usage is not None and 1 <= reply.usage.completion_tokens <= 4
        tree = descendants(gw.proc.pid)
        commands = " | ".join(cmdline(p) for p in tree)
        assert "vllm.entrypoints.openai.api_server" in commands and "EngineCore" in commands, commands
        try:
            os.kill(gw.proc.pid, signal.SIGTERM)
            gw.proc.wait(60)
            wait_until(lambda: not any(alive(p) for p in tree), 30, "no engine process left")
        finally:
            kill_leftovers(tree)


def test_a_process_group_of_zombies_is_not_alive() -> None:
    """A stop or restart waits for a worker's group to end: zombies, which a gateway running as PID 1 (or a
    subreaper) may never reap, must not hold it to the deadline."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    try:
        wait_until(lambda: Path(f"/proc/{dead.pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] == b"Z", 10,
                   "a zombie (exited, not reaped)")
        os.killpg(dead.pid, 0)  # the kernel still counts it in its group
        assert not _group_alive(dead.pid)
        assert _group_alive(live.pid)
    finally:
        live.kill()
        live.wait()
        dead.wait()
