"""Load with a worker killed in the middle: every stream must end in ``[DONE]`` or an in-band error event.

Two fake workers (real processes: bench/fakeworker.py), a `tokengate serve` process in front of them, C
concurrent closed-loop streams for D seconds (loopback only, bounded in count and time); at K seconds one worker
gets SIGKILL. Every request is classified:

    done         the stream ended with [DONE]
    error_event  the stream ended with one in-band {"error": ...} event (streams cut by the killed worker)
    http_error   refused before the first byte with an OpenAI-shaped error status (e.g. 502/503)
    truncated    ended without [DONE] and without an error event: the failure this checks for
    timeout      no end within the request timeout

    python -m bench.chaos --streams 1000 --duration 60 --kill-at 30     # the issue's figure (~70 s)

tests/test_chaos.py runs the same at a small scale.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from .loadclient import RequestRecord, Target, chat_body, run_closed

ROOT = Path(__file__).resolve().parent.parent


def classify(r: RequestRecord) -> str:
    if r.error is None and r.done:
        return "done"
    err = r.error or ""
    if err.startswith("in-band error"):
        return "error_event" if not r.done else "truncated"
    if err.startswith("HTTP ") and r.status >= 400:
        return "http_error"
    if err.startswith("timeout"):
        return "timeout"
    return "truncated"


def outcome_summary(records: list[RequestRecord]) -> tuple[dict[str, int], dict[str, str]]:
    """How many requests ended each way, and the first error message of each way that is not ``done``."""
    outcomes: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for r in records:
        kind = classify(r)
        outcomes[kind] += 1
        if kind != "done":
            examples.setdefault(kind, (r.error or "")[:200])
    return dict(outcomes), examples


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_fd_limit(n: int = 65536) -> None:
    """Raise this process's (and so its children's) open-file limit to ``n``: the hard limit too, where allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < n:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
            return
        except (ValueError, OSError):  # not privileged: as far as the hard limit goes
            n = hard
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


@dataclass
class Stack:
    workers: list[subprocess.Popen[bytes]]
    gateway: subprocess.Popen[bytes]
    url: str
    logs: list[Any]

    def stop(self) -> None:
        for p in [self.gateway, *self.workers]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in [self.gateway, *self.workers]:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in self.logs:
            log.close()


def start_stack(*, ttft: float, token_delay: float, tokens: int, log_dir: Path, n_workers: int = 2,
                extra: tuple[str, ...] = ()) -> Stack:
    workers, urls, logs = [], [], []
    for i in range(n_workers):
        port = _free_port()
        log = open(log_dir / f"chaos-worker{i}.log", "wb")  # noqa: SIM115
        logs.append(log)
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "bench.fakeworker", "--port", str(port), "--ttft", str(ttft),
             "--token-delay", str(token_delay), "--tokens", str(tokens)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
        urls.append(f"http://127.0.0.1:{port}")
    port = _free_port()
    log = open(log_dir / "chaos-gateway.log", "wb")  # noqa: SIM115
    logs.append(log)
    gateway = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--upstream", *urls, "--port", str(port), "--log-level",
         "warning", "--queue-size", "100000", "--worker-concurrency", "100000", *extra],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TOKENGATE_DISCOVERY_INTERVAL": "1"})
    stack = Stack(workers, gateway, f"http://127.0.0.1:{port}", logs)
    deadline = time.monotonic() + 60
    while True:
        try:
            doc = httpx.get(stack.url + "/readyz", timeout=2).json()
            if sum(w["ready"] for w in doc["workers"]) == n_workers:
                return stack
        except (httpx.HTTPError, ValueError):
            pass
        if time.monotonic() > deadline or gateway.poll() is not None:
            stack.stop()
            raise RuntimeError(f"gateway not ready; see {log_dir}/chaos-gateway.log")
        time.sleep(0.2)


async def _run(stack: Stack, streams: int, duration: float, kill_at: float, max_tokens: int,
               timeout: float) -> tuple[list[RequestRecord], float]:
    target = Target.build(stack.url, chat_body(max_tokens=max_tokens, stream=True))

    async def killer() -> None:
        await asyncio.sleep(kill_at)
        stack.workers[0].send_signal(signal.SIGKILL)

    kill = asyncio.create_task(killer())
    result = await run_closed(target, concurrency=streams, duration=duration, timeout=timeout)
    await kill
    return result.records, result.elapsed


def run_chaos(*, streams: int, duration: float, kill_at: float, ttft: float = 0.05, token_delay: float = 0.05,
              tokens: int = 40, timeout: float = 30.0, log_dir: Path | None = None) -> dict[str, Any]:
    raise_fd_limit()
    log_dir = log_dir or Path(os.environ.get("TMPDIR", "/tmp"))
    stack = start_stack(ttft=ttft, token_delay=token_delay, tokens=tokens, log_dir=log_dir)
    try:
        records, elapsed = asyncio.run(_run(stack, streams, duration, kill_at, tokens, timeout))
        metrics = httpx.get(stack.url + "/metrics", timeout=10).text
        readyz = httpx.get(stack.url + "/readyz", timeout=10).json()
        gateway_alive = stack.gateway.poll() is None
    finally:
        stack.stop()
    outcomes, examples = outcome_summary(records)
    return {
        "streams": streams, "duration_s": duration, "kill_at_s": kill_at, "elapsed_s": round(elapsed, 2),
        "requests": len(records), "outcomes": outcomes, "examples": examples,
        "gateway_alive": gateway_alive,
        "workers_ready_after": [w["ready"] for w in readyz["workers"]],
        "upstream_errors": {line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
                            for line in metrics.splitlines() if line.startswith("tokengate_upstream_errors_total{")},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--kill-at", type=float, default=30.0)
    p.add_argument("--tokens", type=int, default=40)
    p.add_argument("--token-delay", type=float, default=0.05)
    p.add_argument("--out", type=Path, help="also write the result JSON here")
    args = p.parse_args(argv)
    result = run_chaos(streams=args.streams, duration=args.duration, kill_at=args.kill_at, tokens=args.tokens,
                       token_delay=args.token_delay)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    bad = result["outcomes"].get("truncated", 0) + result["outcomes"].get("timeout", 0)
    return 1 if bad or not result["gateway_alive"] else 0


if __name__ == "__main__":
    sys.exit(main())
