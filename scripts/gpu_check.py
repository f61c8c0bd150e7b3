"""Checks a gateway running managed GPU workers (scripts/gpu_smoke.sh starts it): readiness, the OpenAI SDK
path, caps, routing over every worker, a kill -9 with restart, and TTFT through the gateway next to the engine's
own TTFT. Writes ``gpu_check_<tag>.json`` to OUT and exits non-zero when a check fails.

usage: python3 scripts/gpu_check.py GATEWAY_URL OUT TAG EXPECTED_WORKERS
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from typing import Any

import httpx
import openai

URL, OUT, TAG, EXPECTED = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
MODEL = "tiny-llama"
results: dict[str, Any] = {"tag": TAG, "checks": {}}
failures: list[str] = []


def check(name: str, ok: bool, detail: Any = None) -> None:
    results["checks"][name] = {"ok": ok, "detail": detail}
    print(f"[{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)
    if not ok:
        failures.append(name)


def readyz() -> dict[str, Any]:
    doc: dict[str, Any] = httpx.get(URL + "/readyz", timeout=5).json()
    return doc


def wait_ready(n: int, timeout: float) -> float:
    t0 = time.monotonic()
    last: Any = None
    while time.monotonic() - t0 < timeout:
        try:
            last = readyz()
            if sum(w["ready"] for w in last["workers"]) >= n:
                return time.monotonic() - t0
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(1)
    raise SystemExit(f"workers not ready after {timeout} s: {last}")


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def main() -> None:
    t_ready = wait_ready(EXPECTED, 420)
    doc = readyz()
    results["ready_after_s"] = round(t_ready, 1)
    results["workers"] = [{k: w[k] for k in ("name", "region", "preset", "ready", "pid")} for w in doc["workers"]]
    check("all workers ready", len(doc["workers"]) == EXPECTED and all(w["ready"] for w in doc["workers"]),
          results["workers"])

    models = httpx.get(URL + "/v1/models").json()["data"]
    check("/v1/models", [m["id"] for m in models] == [MODEL] and models[0]["max_model_len"] == 4096, models)

    client = openai.OpenAI(base_url=URL + "/v1", api_key="unused-open-mode")
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello GPU"}],
                                          max_tokens=16, stream=False)
    check("SDK non-stream chat", chat.usage is not None and chat.usage.completion_tokens == 16
          and chat.choices[0].finish_reason == "length", chat.usage.model_dump() if chat.usage else None)
    pieces = [c for c in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Stream please"}], max_tokens=16, stream=True,
        stream_options={"include_usage": True})]
    usage = pieces[-1].usage
    check("SDK streamed chat with usage", usage is not None and usage.completion_tokens == 16,
          usage.model_dump() if usage else None)
    comp = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, stream=False)
    check("SDK completion", comp.usage is not None and comp.usage.completion_tokens == 8, comp.usage)

    # default is a stream; caps: clamp header, context cap 400 before any GPU time
    r = httpx.post(URL + "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                       "max_tokens": 100000}, timeout=60)
    check("stream by default + clamp header", r.headers.get("content-type", "").startswith("text/event-stream")
          and r.headers.get("x-tokengate-max-tokens-clamped") == "100000" and r.text.rstrip().endswith("[DONE]"),
          dict(r.headers))
    long = " ".join(f"w{i}" for i in range(6000))
    r = httpx.post(URL + "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": long}]},
                   timeout=60)
    check("context cap 400", r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded",
          r.json().get("error"))

    # load: 64 concurrent streams, spread over the workers; TTFT through the gateway vs the engine's own
    before = httpx.get(URL + "/metrics").text + httpx.get(URL + "/metrics/workers").text
    workers_used: Counter[str] = Counter()
    errors: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"request {i} tell me a story"}],
                "max_tokens": 64}
        try:
            with httpx.stream("POST", URL + "/v1/chat/completions", json=body, timeout=120) as resp:
                done = any(line == "data: [DONE]" for line in resp.iter_lines())
                with lock:
                    workers_used[resp.headers.get("x-tokengate-worker", "?")] += 1
                    if not done:
                        errors.append(f"stream without [DONE] from {resp.headers.get('x-tokengate-worker')}")
        except httpx.HTTPError as exc:
            with lock:
                errors.append(repr(exc))

    for round_ in range(3):
        threads = [threading.Thread(target=one, args=(round_ * 64 + i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    after = httpx.get(URL + "/metrics").text + httpx.get(URL + "/metrics/workers").text

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    def mean(name: str, scale: float = 1.0, **labels: str) -> float | None:
        n = delta(name + "_count", **labels)
        return round(scale * delta(name + "_sum", **labels) / n, 3) if n else None

    decode = delta("vllm:request_decode_time_seconds_sum")
    engine_requests = delta("vllm:request_decode_time_seconds_count")
    latency = {
        "gateway_ttft_ms": mean("tokengate_time_to_first_token_seconds", 1000),
        "engine_ttft_ms": mean("vllm:time_to_first_token_seconds", 1000),
        "gateway_itl_ms": mean("tokengate_inter_token_latency_seconds", 1000),
        "engine_itl_ms": mean("vllm:inter_token_latency_seconds", 1000),
        "gateway_tps": mean("tokengate_output_tokens_per_second"),
        # the same definition as the gateway's: tokens after the first / time from first to last token
        "engine_tps": round((delta("vllm:generation_tokens_total") - engine_requests) / decode, 1) if decode else None,
        "dispatch_ms": mean("tokengate_gateway_overhead_seconds", 1000, phase="dispatch"),
        "relay_us_per_chunk": mean("tokengate_gateway_overhead_seconds", 1e6, phase="relay"),
    }
    load = {"requests": 192, "errors": errors[:5], "n_errors": len(errors), "workers_used": dict(workers_used)}
    results["load"] = load
    results["latency"] = latency
    check("192 streams, no errors, every worker used", not errors and len(workers_used) == EXPECTED, load)
    check("latency: gateway and engine figures present", None not in latency.values(), latency)

    # kill -9 one worker: traffic continues on the others, the supervisor restarts it
    victim = doc["workers"][0]
    os.kill(victim["pid"], signal.SIGKILL)
    t_kill = time.monotonic()
    seen_down = False
    while time.monotonic() - t_kill < 30:
        w = next(w for w in readyz()["workers"] if w["name"] == victim["name"])
        if not w["ready"]:
            seen_down = True
            break
        time.sleep(0.2)
    check("killed worker leaves rotation", seen_down, victim["name"])
    if EXPECTED > 1:
        ok = [client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "still there?"}],
                                             max_tokens=4, stream=False).usage is not None for _ in range(8)]
        check("others keep serving while it restarts", all(ok), len(ok))
    back = None
    while time.monotonic() - t_kill < 400:
        w = next(w for w in readyz()["workers"] if w["name"] == victim["name"])
        if w["ready"] and w["pid"] != victim["pid"]:
            back = time.monotonic() - t_kill
            break
        time.sleep(1)
    restarts = metric(httpx.get(URL + "/metrics").text, "tokengate_worker_restarts_total")
    results["restart_s"] = round(back, 1) if back else None
    check("worker restarted and ready again", back is not None and restarts >= 1,
          {"seconds": results["restart_s"], "restarts_total": restarts})
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "after restart"}],
                                       max_tokens=4, stream=False)
    check("serves after the restart", r.usage is not None and r.usage.completion_tokens == 4, None)


try:
    main()
finally:
    results["failures"] = failures
    with open(os.path.join(OUT, f"gpu_check_{TAG}.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
sys.exit(1 if failures else 0)
