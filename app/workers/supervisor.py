"""Launches, watches, restarts and stops managed vLLM worker processes. Never imported by request code.

Each worker runs in its own process group (its engine children too) and is told to die with the gateway
(``PR_SET_PDEATHSIG``).  That signal reaches the worker only, not vLLM's engine processes under it, so a small
janitor process (its own session, no state but the worker groups it is told about; ``janitor.py``) kills the groups
when its pipe from the gateway closes: no worker process outlives us even when we are killed with SIGKILL. What a
group's processes had mapped in /dev/shm is removed once the group has ended (the janitor's, or here after a crash
or a stop): a process killed with SIGKILL unlinks nothing, and vLLM keeps its engine queues there.  A worker that
exits is restarted after a backoff that doubles from ``backoff_base`` to ``backoff_max`` and resets once it
had been ready for ``healthy_after`` seconds; while it is down it is out of rotation, with the supervisor's reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..metrics import GatewayMetrics
from .janitor import group_members, remove, shm_of
from .logs import MAX_LOG_BYTES, rotate
from .registry import Registry, Worker, doubling

log = logging.getLogger("tokengate.supervisor")
_PR_SET_PDEATHSIG = 1
# the janitor process: "+PGID" / "-PGID" lines on stdin; end of input (the gateway exited or was killed) kills every
# group still known and removes the /dev/shm files their processes had mapped
_JANITOR = str(Path(__file__).with_name("janitor.py"))
HOUSEKEEPING_EVERY = 5.0  # seconds between looks at each worker's /dev/shm files and log size


GROUP_GRACE = 5.0  # seconds a dead server's process group gets to end on its own before it is killed


async def _end_groups(pgids: list[int], deadline: float) -> None:
    """Wait until these process groups are gone or ``deadline``, then SIGKILL what is left. What is left once a
    worker's server has exited: vLLM's engine processes, and multiprocessing's resource tracker, which unlinks the
    engine's /dev/shm segments as it ends (killed with the group at once, it left them behind)."""
    alive = pgids
    while alive and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        alive = [g for g in alive if _group_alive(g)]
    for g in alive:
        with contextlib.suppress(OSError):
            os.killpg(g, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    """Some process of the group is still running. Zombies don't count: one re-parented to a gateway that is PID 1
    in a container, or a subreaper, is never reaped by asyncio (which waits for its own children only)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not os.path.isdir("/proc"):
        return True  # no /proc to tell zombies apart: alive, to be safe (the deadline bounds the wait)
    return bool(group_members(pgid))


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    name: str
    region: str
    preset: str
    argv: tuple[str, ...]
    env: dict[str, str]
    port: int
    api_key: str
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass(slots=True)
class _Managed:
    spec: WorkerSpec
    worker: Worker
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    failures_in_row: int = 0
    stopping: bool = False
    exits: list[int] = field(default_factory=list)
    shm: set[str] = field(default_factory=set)  # /dev/shm files its processes mapped: removed once its group ended


def _served_names(argv: tuple[str, ...]) -> frozenset[str]:
    """The model names a vLLM command line will serve (--served-model-name, else --model)."""
    for flag in ("--served-model-name", "--model"):
        if flag in argv[:-1]:
            return frozenset({argv[argv.index(flag) + 1]})
    return frozenset()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # pragma: no cover - not Linux
        pass


class Supervisor:
    def __init__(self, specs: Sequence[WorkerSpec], registry: Registry, metrics: GatewayMetrics, *,
                 backoff_base: float = 1.0, backoff_max: float = 60.0, healthy_after: float = 60.0,
                 stop_timeout: float = 20.0, on_start: Callable[[], None] | None = None,
                 housekeeping_every: float = HOUSEKEEPING_EVERY, log_max_bytes: int = MAX_LOG_BYTES) -> None:
        self.registry = registry
        self.metrics = metrics
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.healthy_after = healthy_after
        self.stop_timeout = stop_timeout
        self.on_start = on_start
        self.housekeeping_every = housekeeping_every
        self.log_max_bytes = log_max_bytes
        self._managed = [
            _Managed(s, Worker(name=s.name, url=s.url, region=s.region, preset=s.preset, api_key=s.api_key,
                               expected_models=_served_names(s.argv)))
            for s in specs
        ]
        self._tasks: list[asyncio.Task[None]] = []
        self._janitor: subprocess.Popen[str] | None = None

    @property
    def managed(self) -> list[_Managed]:
        return self._managed

    def pid_of(self, name: str) -> int | None:
        for m in self._managed:
            if m.spec.name == name and m.proc is not None and m.proc.returncode is None:
                return m.proc.pid
        return None

    def spec_of(self, name: str) -> WorkerSpec | None:
        return next((m.spec for m in self._managed if m.spec.name == name), None)

    def restarts_of(self, name: str) -> int:
        return next((m.restarts for m in self._managed if m.spec.name == name), 0)

    def pids(self) -> list[int]:
        return [m.proc.pid for m in self._managed if m.proc is not None and m.proc.returncode is None]

    async def start(self) -> None:
        self._start_janitor()
        for m in self._managed:
            m.worker.reason = "starting"
            self.registry.add(m.worker)
            self.metrics.worker_up.labels(m.spec.region, m.spec.preset, m.spec.name).set(0)
            self.metrics.worker_restarts.labels(m.spec.region, m.spec.preset, m.spec.name)
            self._tasks.append(asyncio.create_task(self._keep_running(m), name=f"supervise-{m.spec.name}"))
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="supervise-housekeeping"))

    async def _housekeeping(self) -> None:
        """Every few seconds: the /dev/shm files each live worker has mapped, and its log file's size."""
        while True:
            for m in self._managed:
                await self._look_at_shm(m)
                if await asyncio.to_thread(rotate, m.spec.log_path, self.log_max_bytes):
                    log.info("worker %s: log rotated to %s.1", m.spec.name, m.spec.log_path)
            await asyncio.sleep(self.housekeeping_every)

    async def _look_at_shm(self, m: _Managed) -> None:
        if m.proc is not None:
            m.shm |= await asyncio.to_thread(shm_of, m.proc.pid)

    def _free_shm(self, m: _Managed) -> None:
        """What a worker whose group has ended left in /dev/shm (a SIGKILL, of its engine or of it, unlinks
        nothing; vLLM's queues there are hundreds of MiB of memory)."""
        freed = remove(m.shm)
        m.shm.clear()
        if freed:
            log.warning("worker %s left %.0f MiB in /dev/shm: removed", m.spec.name, freed / 2**20)

    async def _spawn(self, m: _Managed) -> None:
        spec = m.spec
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = open(spec.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            logf.write(f"\n==== tokengate: starting {spec.name}: {' '.join(spec.argv)}\n".encode())
            logf.flush()
            m.proc = await asyncio.create_subprocess_exec(
                *spec.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                env={**os.environ, **spec.env}, start_new_session=True, preexec_fn=_die_with_parent,
            )
        finally:
            logf.close()
        m.started_at = time.monotonic()
        m.worker.process_down = False
        self._tell_janitor(f"+{m.proc.pid}")
        log.info("worker %s started (pid %d, port %d), log: %s", spec.name, m.proc.pid, spec.port, spec.log_path)
        if self.on_start is not None:
            self.on_start()

    async def _keep_running(self, m: _Managed) -> None:
        while not m.stopping:
            m.proc = None  # (a failed start leaves none: the last one's group is not to be signalled again)
            ended = time.monotonic()
            try:
                await self._spawn(m)
            except OSError as exc:
                log.error("worker %s could not start: %s", m.spec.name, exc)
                m.exits.append(-1)
                m.started_at = ended  # up for no time: a failure in a row
            else:
                assert m.proc is not None
                code = await m.proc.wait()
                ended = time.monotonic()
                m.exits.append(code)
                if m.stopping:
                    return
                log.warning("worker %s exited with %s", m.spec.name, code)
            m.worker.process_down = True
            self.registry.update(m.worker, ready=False, reason=f"exited ({m.exits[-1]}), restarting")
            self.metrics.worker_up.labels(m.spec.region, m.spec.preset, m.spec.name).set(0)
            if m.proc is not None:  # engine children of a dead server: asked, then made, to go
                await self._look_at_shm(m)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(m.proc.pid, signal.SIGTERM)
                await _end_groups([m.proc.pid], time.monotonic() + GROUP_GRACE)
                self._tell_janitor(f"-{m.proc.pid}")
                self._free_shm(m)
            # how long it served: from becoming ready (start-up, minutes for a large model, does not count) to its
            # exit (not counting the wait for its group to end)
            ready_at = m.worker.ready_at
            up_for = ended - ready_at if ready_at is not None and ready_at >= m.started_at else 0.0
            m.failures_in_row = 1 if up_for >= self.healthy_after else m.failures_in_row + 1
            delay = doubling(self.backoff_base, self.backoff_max, m.failures_in_row - 1)
            if m.failures_in_row > 1:
                m.worker.reason = f"crash loop: {m.failures_in_row} exits in a row, next start in {delay:g} s"
            self.registry.update(m.worker, ready=False, reason=m.worker.reason)
            await asyncio.sleep(delay)
            m.restarts += 1
            self.metrics.worker_restarts.labels(m.spec.region, m.spec.preset, m.spec.name).inc()

    async def stop(self) -> None:
        """TERM every worker's process group, wait, then KILL what is left."""
        for m in self._managed:
            m.stopping = True
            m.worker.process_down = True
            self.registry.update(m.worker, ready=False, reason="stopping")
        for task in self._tasks:
            if not task.done():
                task.cancel()
        procs = [m.proc for m in self._managed if m.proc is not None and m.proc.returncode is None]
        for m in self._managed:
            await self._look_at_shm(m)
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                log.warning("worker pid %d ignored SIGTERM; killing", p.pid)
        await _end_groups([p.pid for p in procs], deadline)
        for p in procs:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                await asyncio.wait_for(p.wait(), 5)
            self._tell_janitor(f"-{p.pid}")
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for m in self._managed:
            self._free_shm(m)
        await self._stop_janitor()

    def _start_janitor(self) -> None:
        try:
            self._janitor = subprocess.Popen([sys.executable, "-I", _JANITOR], stdin=subprocess.PIPE,
                                             stdout=subprocess.DEVNULL, text=True, start_new_session=True)
        except OSError as exc:
            log.warning("no janitor process (%s): if the gateway is killed, engine processes may outlive it", exc)

    def _tell_janitor(self, line: str) -> None:
        j = self._janitor
        if j is None or j.stdin is None:
            return
        try:
            j.stdin.write(line + "\n")
            j.stdin.flush()
        except OSError as exc:  # it died: workers still die with the gateway, their engine children may not
            log.warning("janitor process gone (%s)", exc)
            self._janitor = None

    async def _stop_janitor(self) -> None:
        j, self._janitor = self._janitor, None
        if j is None:
            return
        with contextlib.suppress(OSError):
            if j.stdin is not None:
                j.stdin.close()  # its cue: every group it still knows is gone already
        try:
            await asyncio.to_thread(j.wait, 5)
        except subprocess.TimeoutExpired:
            j.kill()
            await asyncio.to_thread(j.wait)
