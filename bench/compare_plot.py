"""Plots for ``bench/compare.py`` from its JSON; runs wherever matplotlib is (``bench/.venvs/plot``).

    python bench/compare_plot.py bench/results/compare.json bench/results compare

Writes NAME-ttft.png (added TTFT p50/p99 and gateway CPU per 1000 requests vs concurrency, one line per arm, one row
per mode) and NAME-rate.png (open-loop max rate held and closed-loop saturation req/s per arm); prints their paths.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

LABEL = {"direct": "direct", "tokengate": "tokengate", "vllm-router": "vllm-router", "litellm": "LiteLLM"}
COLOR = {"direct": "#555555", "tokengate": "#1f77b4", "vllm-router": "#d62728", "litellm": "#2ca02c"}


def _ttft(res: dict[str, Any], path: Path) -> bool:
    cells = res["fixed"]
    modes = [m for m in ("stream", "nonstream") if any(c["mode"] == m for c in cells)]
    if not modes:
        return False
    panels = (("ttft_p50", "added TTFT p50 (ms)"), ("ttft_p99", "added TTFT p99 (ms)"),
              ("cpu", "gateway CPU-s / 1000 requests"))
    fig, axes = plt.subplots(len(modes), 3, figsize=(15, 4.2 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        mc = sorted((c for c in cells if c["mode"] == mode), key=lambda c: c["concurrency"])
        arms = [a for a in LABEL if a != "direct" and any(a in c["arms"] for c in mc)]
        for j, (key, title) in enumerate(panels):
            ax = axes[i][j]
            for arm in arms:
                xs, ys = [], []
                for c in mc:
                    s = c["arms"].get(arm)
                    if s is None:
                        continue
                    y = s["gateway_cpu_s_per_1k"] if key == "cpu" else s["added_ms"][key]
                    if y is not None and y == y:
                        xs.append(c["concurrency"])
                        ys.append(y)
                ax.plot(xs, ys, "o-", label=LABEL[arm], color=COLOR[arm])
            ax.set_xscale("log", base=2)
            ax.set_xticks([c["concurrency"] for c in mc], [str(c["concurrency"]) for c in mc])
            ax.set_yscale("symlog", linthresh=1.0) if key != "cpu" else ax.set_yscale("log")
            ax.set_xlabel("concurrent streams")
            ax.set_title(f"{title}, {mode}")
            ax.grid(True, which="both", alpha=0.3)
            if key != "cpu":
                ax.axhline(0, color="black", lw=0.8)
        axes[i][0].legend()
    fig.suptitle("Paced fake worker (20 ms to first token, 10 ms/token, 64 tokens): what each gateway adds over direct")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _rate(res: dict[str, Any], path: Path) -> bool:
    sweeps, sats = res["sweep"], res["saturation"]
    if not sweeps and not sats:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), squeeze=False)
    for ax, rows, title in ((axes[0][0], sweeps, "open loop: max Poisson rate held (req/s)"),
                            (axes[0][1], sats, "closed loop, c=64: req/s")):
        modes = [r["mode"] for r in rows]
        arms = [a for a in LABEL if any(a in (r["max"] if "max" in r else r["arms"]) for r in rows)]
        width = 0.8 / max(1, len(arms))
        for k, arm in enumerate(arms):
            vals, texts, below = [], [], []
            for r in rows:
                if "max" in r:  # sweep: "< first failed rate" when none held, "≥" when it never failed
                    m = r["max"].get(arm) or {}
                    rate, fail = m.get("rate"), m.get("first_fail")
                    below.append(rate is None and fail is not None)
                    vals.append(rate or fail or 0)
                    texts.append(f"< {fail:,.0f}" if below[-1] else f"≥ {rate:,.0f}" if fail is None and rate
                                 else f"{rate or 0:,.0f}")
                else:
                    vals.append((r["arms"].get(arm) or {}).get("rps") or 0)
                    texts.append(f"{vals[-1]:,.0f}")
                    below.append(False)
            xs = [i + (k - (len(arms) - 1) / 2) * width for i in range(len(rows))]
            bars = ax.bar(xs, vals, width, label=LABEL[arm], color=COLOR[arm])
            for bar, hollow in zip(bars, below, strict=True):
                if hollow:  # nothing held: an outline up to the first failed rate
                    bar.set_fill(False)
                    bar.set_edgecolor(COLOR[arm])
                    bar.set_hatch("//")
            ax.bar_label(bars, texts, fontsize=8)
        ax.set_xticks(range(len(rows)), modes)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend([Patch(color=COLOR[a]) for a in arms], [LABEL[a] for a in arms], fontsize=8)
    fig.suptitle("Zero-delay fake worker, 16 tokens (higher is better; direct = load client + worker ceiling)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    src, out, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    res = json.loads(src.read_text())
    for suffix, fn in (("ttft", _ttft), ("rate", _rate)):
        p = out / f"{name}-{suffix}.png"
        if fn(res, p):
            print(p)


if __name__ == "__main__":
    main()
