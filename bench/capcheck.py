"""How long the exact cap check of a long chat takes, and whether it ever blocks the event loop.

The gateway's own path (PromptCounter.size -> caps.decide, with the model's tokenizer and chat template, a long
prompt counted in a worker thread) runs N times on uvloop for a chat of ~T tokens, next to a 1 ms ticker that
records how late it wakes up (event-loop lag). Prints p50/p99 of the check and the worst lag.

    python -m bench.capcheck --tokens 8000 --runs 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import uvloop

from app.caps import Caps, decide
from app.counting import PromptCounter
from app.protocol import parse_request
from app.settings import Settings
from app.tinymodel import build_tiny_model
from app.tokenizer import LocalTokenizer


def long_chat(tok: LocalTokenizer, target: int) -> tuple[bytes, int]:
    """A two-message chat whose templated prompt is about ``target`` tokens."""
    words = [f"word{i % 997} river stone bridge {i}" for i in range(target)]
    lo, hi = 1, len(words)
    while lo < hi:  # the most text that stays at or under the target
        mid = (lo + hi + 1) // 2
        msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": " ".join(words[:mid])}]
        if tok.count(tok.render_chat(msgs), add_special_tokens=False) <= target:
            lo = mid
        else:
            hi = mid - 1
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": " ".join(words[:lo])}]
    n = tok.count(tok.render_chat(msgs), add_special_tokens=False)
    return orjson.dumps({"model": "tiny", "messages": msgs, "max_tokens": 256}), n


async def measure(raw: bytes, tok: LocalTokenizer, runs: int, offloop: int) -> dict[str, Any]:
    counter = PromptCounter(ThreadPoolExecutor(2), offloop_bytes=offloop)
    caps = Caps(max_tokens_cap=4096, default_max_tokens=256, context_cap=8192 + 512, model_max_len=16384,
                policy="clamp")
    lags: list[float] = []
    stop = False

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        while not stop:
            t0 = loop.time()
            await asyncio.sleep(0.001)
            lags.append(loop.time() - t0 - 0.001)

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    times: list[float] = []
    for _ in range(runs):
        t0 = time.perf_counter()
        req = parse_request("chat", raw)
        size = counter.size(req, tok, _no_remote, max_model_len=caps.model_max_len)
        decision = await decide(caps, req.max_tokens, req.max_tokens_param, size, prompt_param="messages",
                                model="tiny")
        times.append(time.perf_counter() - t0)
        assert decision.prompt_tokens is not None  # near the cap: the exact count was needed
    stop = True
    await tick
    times.sort()
    return {
        "check_p50_ms": round(1000 * statistics.median(times), 3),
        "check_p99_ms": round(1000 * times[int(0.99 * (len(times) - 1))], 3),
        "loop_lag_max_ms": round(1000 * max(lags), 3),
        "loop_lag_p99_ms": round(1000 * sorted(lags)[int(0.99 * (len(lags) - 1))], 3),
    }


async def _no_remote(payload: dict[str, Any]) -> int:
    raise AssertionError("counted locally")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8000)
    p.add_argument("--runs", type=int, default=200)
    args = p.parse_args(argv)
    root = build_tiny_model(Path(tempfile.gettempdir()) / "tokengate-bench-tiny")
    tok = LocalTokenizer(root)
    raw, n = long_chat(tok, args.tokens)
    offloop = Settings().tokenize_offloop_bytes
    result = {"prompt_tokens": n, "prompt_bytes": len(raw), "runs": args.runs, "offloop_bytes": offloop,
              **uvloop.run(measure(raw, tok, args.runs, offloop))}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
