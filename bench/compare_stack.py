"""``bench/compare.py``'s processes: the regimes, one regime's fake worker and gateways (launched pinned, checked
with one request each), and CPU accounting from /proc."""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import peers
from bench.loadclient import Target, chat_body, run_closed
from bench.overhead import Regime, free_port, pids_cpu_seconds, spawn, stop, tree_pids, wait_http

REGIMES = {
    "paced": Regime("paced", 0.020, 0.010, 64, "worker 20 ms to first token, 10 ms/token, 64 tokens"),
    "saturation": Regime("saturation", 0.0, 0.0, 16, "zero-delay worker, 16 tokens"),
}


def cpu_probe(roots: dict[str, int]) -> Callable[[], dict[str, float]]:
    """A reader of CPU seconds per root pid and its descendants (found now, by one walk of /proc per root; the
    reader only reads their counters, cheap enough for the middle of a measured run): ``NAME`` (utime + stime from
    /proc/PID/stat, 10 ms ticks) and ``NAME:ns`` (sum of /proc/PID/task/*/schedstat run time: ns resolution, live
    threads only); ``cpuN``: busy time of CPU N from /proc/stat."""
    trees = {name: tree_pids(root) for name, root in roots.items()}
    hz = os.sysconf("SC_CLK_TCK")

    def read() -> dict[str, float]:
        out: dict[str, float] = {}
        for name, tree in trees.items():
            ns = 0
            for p in tree:
                with contextlib.suppress(OSError):
                    for tid in os.listdir(f"/proc/{p}/task"):
                        with contextlib.suppress(OSError, ValueError, IndexError):
                            ns += int(Path(f"/proc/{p}/task/{tid}/schedstat").read_text().split()[0])
            out[name] = pids_cpu_seconds(tree)
            out[f"{name}:ns"] = ns / 1e9
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu") and line[3:4].isdigit():
                name, *v = line.split()
                user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in v[:8])
                out[name] = (user + nice + system + irq + softirq + steal) / hz
        return out

    return read


def client_cpu() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class Stack:
    """One regime's fake worker and gateways, all running; ``urls`` holds the arms that work."""

    regime: Regime
    worker: subprocess.Popen[bytes]
    urls: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]]
    failed: dict[str, str]
    cmds: dict[str, list[str]]

    @property
    def arms(self) -> list[str]:
        return list(self.urls)

    def pids(self) -> dict[str, int]:
        return {"worker": self.worker.pid, **{arm: p.pid for arm, p in self.procs.items()}}

    def close(self) -> None:
        for p in self.procs.values():
            stop(p)
        stop(self.worker)


def _ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


def launch(reg: Regime, arms: list[str], a: argparse.Namespace, logdir: Path) -> Stack:
    wport, *ports = _ports(1 + 2 * len(arms))
    wlog = logdir / f"worker-{reg.name}.log"
    wcmd = [sys.executable, "-m", "bench.fakeworker", "--port", str(wport), "--ttft", str(reg.ttft),
            "--token-delay", str(reg.token_delay), "--tokens", str(reg.tokens)]
    worker = spawn(wcmd, a.client_cpu, wlog)
    stack = Stack(reg, worker, {}, {}, {}, {"worker": wcmd})
    try:
        wait_http(wport, "/health", worker, wlog, 15)  # vllm-router checks /health once before it listens
        upstream = f"http://127.0.0.1:{wport}"
        launches: dict[str, tuple[int, peers.Launch]] = {}
        for arm in arms:
            port, extra = ports.pop(), ports.pop()
            try:
                if arm == "tokengate":
                    launches[arm] = port, peers.tokengate(port, upstream, a.tokengate_extra, src=a.tokengate_src)
                elif arm == "vllm-router":
                    launches[arm] = port, peers.vllm_router(port, upstream, extra)
                elif arm == "litellm":
                    launches[arm] = port, peers.litellm(port, {"tiny": upstream}, logdir / f"litellm-{reg.name}")
            except peers.PeerUnavailable as exc:
                stack.failed[arm] = str(exc)
        for arm, (_, spec) in launches.items():
            stack.cmds[arm] = spec.cmd
            stack.procs[arm] = spawn(spec.cmd, a.gateway_cpu, logdir / f"{arm}-{reg.name}.log", spec.env, spec.cwd)
        if "direct" in arms:
            stack.urls["direct"] = upstream
        for arm, (port, spec) in launches.items():
            try:
                wait_http(port, spec.ready_path, stack.procs[arm], logdir / f"{arm}-{reg.name}.log", a.ready_timeout)
                stack.urls[arm] = f"http://127.0.0.1:{port}"
            except SystemExit as exc:  # wait_http's way of failing; one peer failing must not end the run
                stack.failed[arm] = str(exc)[-600:]
                stop(stack.procs.pop(arm))
    except BaseException:
        stack.close()
        raise
    return stack


async def sanity(stack: Stack, a: argparse.Namespace) -> None:
    """One streaming and one non-streaming request per arm; an arm that fails either is dropped."""
    n = stack.regime.tokens
    for arm in stack.arms:
        for stream in (True, False):
            t = Target.build(stack.urls[arm], chat_body(max_tokens=n, stream=stream, include_usage=a.include_usage))
            r = (await run_closed(t, concurrency=1, requests=1, timeout=30)).records[0]
            bad = r.error or (f"HTTP {r.status}" if r.status != 200 else None)
            if not bad and stream and r.chunks < n:
                bad = f"{r.chunks} SSE events for {n} tokens"
            if bad:
                stack.failed[arm] = f"sanity request (stream={stream}) failed: {bad}"
                del stack.urls[arm]
                if arm in stack.procs:
                    stop(stack.procs.pop(arm))
                break
