"""Many slow streams through one gateway process: its memory, and that none is dropped.

One fake worker paced like a slow model (a token a second), one `tokengate serve` process, C concurrent
closed-loop streams for D seconds (loopback only). Reports the gateway's peak RSS (VmHWM) and RSS at full load,
per-stream memory, and how every request ended (bench/chaos.py's classes).

    python -m bench.soak --streams 10000 --duration 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .chaos import outcome_summary, raise_fd_limit, start_stack
from .loadclient import Target, chat_body, run_closed


def _rss_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def run_soak(*, streams: int, duration: float, token_delay: float, tokens: int,
             log_dir: Path | None = None) -> dict[str, Any]:
    raise_fd_limit(4 * streams + 4096)
    log_dir = log_dir or Path(os.environ.get("TMPDIR", "/tmp"))
    stack = start_stack(ttft=token_delay, token_delay=token_delay, tokens=tokens, log_dir=log_dir, n_workers=1)
    pid = stack.gateway.pid
    idle = _rss_kib(pid)["VmRSS"]
    samples: list[int] = []

    async def main() -> Any:
        target = Target.build(stack.url, chat_body(max_tokens=tokens, stream=True))

        async def sample() -> None:
            while True:
                await asyncio.sleep(1.0)
                samples.append(_rss_kib(pid)["VmRSS"])

        sampler = asyncio.create_task(sample())
        try:
            return await run_closed(target, concurrency=streams, duration=duration, timeout=duration + 60)
        finally:
            sampler.cancel()

    try:
        t0 = time.monotonic()
        result = asyncio.run(main())
        elapsed = time.monotonic() - t0
        peak = _rss_kib(pid)["VmHWM"]
        alive = stack.gateway.poll() is None
    finally:
        stack.stop()
    outcomes, examples = outcome_summary(result.records)
    loaded = max(samples) if samples else peak
    return {
        "streams": streams, "duration_s": duration, "elapsed_s": round(elapsed, 1), "token_delay_s": token_delay,
        "requests": len(result.records), "outcomes": outcomes, "examples": examples, "gateway_alive": alive,
        "gateway_rss_idle_mib": round(idle / 1024, 1), "gateway_rss_loaded_mib": round(loaded / 1024, 1),
        "gateway_rss_peak_mib": round(peak / 1024, 1),
        "kib_per_stream": round((loaded - idle) / streams, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=10000)
    p.add_argument("--duration", type=float, default=40.0)
    p.add_argument("--token-delay", type=float, default=1.0)
    p.add_argument("--tokens", type=int, default=15)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    result = run_soak(streams=args.streams, duration=args.duration, token_delay=args.token_delay,
                      tokens=args.tokens)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    bad = sum(v for k, v in result["outcomes"].items() if k != "done")
    return 1 if bad or not result["gateway_alive"] else 0


if __name__ == "__main__":
    sys.exit(main())
