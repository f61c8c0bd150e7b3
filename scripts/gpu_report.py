"""The part of the GPU smoke run a person reads: the gateway's TTFT/TPS/ITL next to vLLM's own, and vLLM's
reported KV-cache capacity next to the picker's prediction for the same preset and model.

usage: python3 scripts/gpu_report.py OUT PRESET WORKER_LOG_DIR
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

out, preset, logs = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
check = json.loads((out / f"gpu_check_{preset}.json").read_text())
pick = json.loads((out / f"pick_{preset}.json").read_text())
m = check.get("latency", {})
print(f"== {preset}: latency under 64 concurrent streams x 3 rounds (means over the run)")
print(f"{'':28}{'gateway':>12}{'vLLM':>12}{'ratio':>8}")
for name, gw_key, engine_key in (("TTFT (ms)", "gateway_ttft_ms", "engine_ttft_ms"),
                                 ("inter-token latency (ms)", "gateway_itl_ms", "engine_itl_ms"),
                                 ("tokens/s per request", "gateway_tps", "engine_tps")):
    g, e = m.get(gw_key), m.get(engine_key)
    ratio = f"{g / e:.3f}" if g and e else "-"
    print(f"{name:28}{g if g is not None else '-':>12}{e if e is not None else '-':>12}{ratio:>8}")
print(f"gateway dispatch overhead (arrival -> upstream request sent), mean: {m.get('dispatch_ms')} ms")

predicted = next((c for c in pick["candidates"] if c["preset"] == preset), None)
reported = []
for log in sorted(logs.glob("*.log")):
    sizes = re.findall(r"GPU KV cache size: ([\d,]+) tokens", log.read_text(errors="replace"))
    if sizes:
        reported.append((log.stem, int(sizes[-1].replace(",", ""))))
print(f"== {preset}: KV-cache capacity (tokens per worker)")
if predicted is None:
    print("picker: preset not among the candidates")
else:
    print(f"picker prediction: {predicted['kv_capacity_tokens']:,} "
          f"(budget {predicted['budget_bytes_per_gpu'] / 2**30:.2f} GiB/GPU, reserve "
          f"{predicted['reserve_bytes_per_gpu'] / 2**30:.2f} GiB/GPU, {pick['reserve_formula']})")
for name, tokens in reported:
    ratio = f" (prediction / vLLM = {predicted['kv_capacity_tokens'] / tokens:.3f})" if predicted else ""
    print(f"vLLM reported, {name}: {tokens:,}{ratio}")
