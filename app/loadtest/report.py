"""Numbers and files from a benchmark run: stats with vLLM ``bench serve``'s definitions, JSON, a table, plots.

Per request (``client.py`` has the details): TTFT = send → first chunk with ``choices``; TPOT = (e2e − TTFT) /
(output tokens − 1), for requests with more than one output token; ITL = every gap between consecutive chunks with
``choices``, pooled over requests; E2E = send → last chunk with ``choices``.  Percentiles interpolate linearly
between ranks (numpy's default).  Per shape: request throughput = completed / duration and output throughput =
output tokens / duration, duration running from the first send to the last completion; goodput = completed
requests meeting every ``--goodput`` SLO / duration.  Each shape's JSON also carries vLLM's flat names
(``median_ttft_ms``, ``p99_itl_ms``, ``request_goodput``, ...).

Files: ``results.json`` (everything), ``results.md`` (the table), ``report.html`` (self-contained: inline SVG,
no external resources), ``report.png`` (only with matplotlib: ``pip install 'tokengate[bench]'``) and
``requests.jsonl`` (one line per request, for re-analysis).
"""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path
from typing import Any

import orjson

from .charts import chart_specs, render_html
from .client import RequestResult, RunResult
from .shapes import Shape

QUANTILES = (50, 90, 95, 99)
SLO_KEYS = {"ttft": "ttft", "tpot": "tpot", "e2e": "e2e", "e2el": "e2e"}
PNG_HINT = "PNG plots need matplotlib: pip install 'tokengate[bench]' (report.html has the same charts)"
_SLO_RE = re.compile(r"^\s*([a-z0-9]+)\s*[:=]\s*([0-9.]+)\s*(ms|s)?\s*$")


def parse_goodput(spec: str) -> dict[str, float]:
    """``"ttft:500ms,tpot:50ms,e2e:2s"`` → SLOs in seconds (a bare number is milliseconds, as in vLLM)."""
    out: dict[str, float] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        m = _SLO_RE.match(part.lower())
        if m is None or m.group(1) not in SLO_KEYS:
            raise ValueError(f"bad SLO {part.strip()!r}: want KEY:VALUE[ms|s] with KEY one of ttft, tpot, e2e")
        value = float(m.group(2))
        out[SLO_KEYS[m.group(1)]] = value if m.group(3) == "s" else value / 1000
    if not out:
        raise ValueError("no SLO given")
    return out


def percentile(sorted_values: list[float], q: float) -> float:
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def distribution_ms(values: list[float]) -> dict[str, float | None]:
    """mean and p50/p90/p95/p99 in milliseconds; nulls when there are no values."""
    if not values:
        return {"mean": None, **{f"p{q}": None for q in QUANTILES}}
    v = sorted(values)
    out: dict[str, float | None] = {"mean": round(sum(v) / len(v) * 1000, 3)}
    out.update({f"p{q}": round(percentile(v, q) * 1000, 3) for q in QUANTILES})
    return out


def tpot(rec: RequestResult) -> float | None:
    if rec.ttft is None or rec.tokens < 2:
        return None
    return (rec.e2e - rec.ttft) / (rec.tokens - 1)


def meets(rec: RequestResult, slos: dict[str, float]) -> bool:
    """Whether a completed request met every SLO (a one-token answer has no TPOT: it meets that one)."""
    if "ttft" in slos and (rec.ttft is None or rec.ttft > slos["ttft"]):
        return False
    if "tpot" in slos and (tpot(rec) or 0.0) > slos["tpot"]:
        return False
    return not ("e2e" in slos and rec.e2e > slos["e2e"])


def _span(values: list[int]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "min": None, "max": None}
    return {"mean": round(sum(values) / len(values), 2), "min": min(values), "max": max(values)}


def summarize_shape(shape: Shape, run: RunResult, *, slos: dict[str, float] | None = None,
                    rate: float | str | None = None) -> dict[str, Any]:
    ok = [r for r in run.records if r.ok]
    errors: dict[str, int] = {}
    samples: dict[str, str] = {}
    for r in run.records:
        if not r.ok:
            kind = r.error or "error"
            errors[kind] = errors.get(kind, 0) + 1
            samples.setdefault(kind, r.detail or "")
    dur = run.duration
    out_tokens = sum(r.tokens for r in ok)
    prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    good = sum(meets(r, slos) for r in ok) if slos else None
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tpots = [t for r in ok if (t := tpot(r)) is not None]
    itls = [g for r in ok for g in r.itl]
    e2es = [r.e2e for r in ok]
    return {
        "concurrency": shape.concurrency, "prompt_tokens": shape.prompt_tokens, "output_tokens": shape.output_tokens,
        "request_rate": rate, "requests": len(run.records), "completed": len(ok), "failed": len(run.records) - len(ok),
        "errors": errors, "error_samples": samples, "duration_s": round(dur, 3),
        "request_throughput": round(len(ok) / dur, 3), "output_throughput": round(out_tokens / dur, 2),
        "total_token_throughput": round((out_tokens + sum(prompt_tokens)) / dur, 2),
        "goodput": None if good is None else round(good / dur, 3),
        "goodput_ratio": None if good is None or not ok else round(good / len(ok), 4),
        "prompt_tokens_actual": _span(prompt_tokens), "output_tokens_actual": _span([r.tokens for r in ok]),
        "usage_reported": round(sum(r.output_tokens is not None for r in ok) / len(ok), 4) if ok else None,
        "ttft_ms": distribution_ms(ttfts), "tpot_ms": distribution_ms(tpots), "itl_ms": distribution_ms(itls),
        "e2e_ms": distribution_ms(e2es),
        # the same under the flat names of vLLM's ``bench serve --save-result`` JSON, for tools that read those
        "completed_requests": len(ok), "duration": round(dur, 3), "max_concurrency": shape.concurrency,
        "total_input_tokens": sum(prompt_tokens), "total_output_tokens": out_tokens,
        "request_goodput": None if good is None else round(good / dur, 3),
        **vllm_names("ttft", ttfts), **vllm_names("tpot", tpots), **vllm_names("itl", itls),
        **vllm_names("e2el", e2es),
    }


def vllm_names(metric: str, values: list[float]) -> dict[str, float | None]:
    """``mean_ttft_ms``, ``median_ttft_ms``, ``std_ttft_ms``, ``p90_ttft_ms``, ``p95_ttft_ms``, ``p99_ttft_ms``."""
    if not values:
        return {f"{k}_{metric}_ms": None for k in ("mean", "median", "std", *(f"p{q}" for q in QUANTILES[1:]))}
    v = sorted(values)
    mean = sum(v) / len(v)
    out: dict[str, float | None] = {
        f"mean_{metric}_ms": round(mean * 1000, 3), f"median_{metric}_ms": round(percentile(v, 50) * 1000, 3),
        f"std_{metric}_ms": round(math.sqrt(sum((x - mean) ** 2 for x in v) / len(v)) * 1000, 3)}
    out.update({f"p{q}_{metric}_ms": round(percentile(v, q) * 1000, 3) for q in QUANTILES[1:]})
    return out


def request_lines(shape: Shape, run: RunResult) -> list[bytes]:
    """One JSON line per request (times in seconds from the shape's first send)."""
    return [orjson.dumps({"concurrency": shape.concurrency, "prompt_tokens_requested": shape.prompt_tokens,
                          "output_tokens_requested": shape.output_tokens, "start": round(r.start - run.started, 6),
                          "ttft": r.ttft, "e2e": round(r.e2e, 6), "tpot": tpot(r), "output_tokens": r.tokens,
                          "prompt_tokens": r.prompt_tokens, "status": r.status, "error": r.error}) + b"\n"
            for r in run.records]


def series(shapes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (prompt, output): where output throughput stops growing with concurrency, and the best goodput."""
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for s in shapes:
        groups.setdefault((s["prompt_tokens"], s["output_tokens"]), []).append(s)
    out = []
    for (p, o), items in sorted(groups.items()):
        items = sorted(items, key=lambda s: s["concurrency"])
        knee = None
        for a, b in zip(items, items[1:], strict=False):
            if b["output_throughput"] < 1.2 * a["output_throughput"]:
                knee = a["concurrency"]
                break
        peak = max(items, key=lambda s: s["output_throughput"])
        best = max(items, key=lambda s: s["goodput"] or 0.0) if items[0]["goodput"] is not None else None
        out.append({"prompt_tokens": p, "output_tokens": o, "saturation_concurrency": knee,
                    "peak_output_throughput": peak["output_throughput"], "peak_at_concurrency": peak["concurrency"],
                    "best_goodput": best and best["goodput"], "best_goodput_concurrency": best and best["concurrency"]})
    return out


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


BRIEF = (50, 99)  # the terminal's table; results.md and report.html have every one of QUANTILES
_METRICS = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E", "e2e_ms"))


def table_columns(quantiles: tuple[int, ...] = QUANTILES) -> list[str]:
    return ["conc", "in", "out", "ok", "err", "req/s", "out tok/s",
            *(f"{name} p{q}" for name, _ in _METRICS for q in quantiles), "goodput"]


def table_rows(shapes: list[dict[str, Any]], quantiles: tuple[int, ...] = QUANTILES) -> list[list[str]]:
    rows = []
    for s in shapes:
        actual = s["prompt_tokens_actual"]["mean"]
        tokens_in = str(s["prompt_tokens"])
        if actual is not None and abs(actual - s["prompt_tokens"]) >= 0.5:
            tokens_in += f" (~{actual:g})"
        rows.append([str(s["concurrency"]), tokens_in, str(s["output_tokens"]), str(s["completed"]),
                     str(s["failed"]), _fmt(s["request_throughput"], 2), _fmt(s["output_throughput"]),
                     *(_fmt(s[key][f"p{q}"]) for _, key in _METRICS for q in quantiles), _fmt(s["goodput"], 2)])
    return rows


def render_table(summary: dict[str, Any], quantiles: tuple[int, ...] = QUANTILES) -> str:
    """The per-shape table in markdown (times in ms, throughput per second)."""
    columns = table_columns(quantiles)
    rows = [columns, *table_rows(summary["shapes"], quantiles)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    notes = [f"Times in ms; prompts: {summary['prompts']['source']}."]
    if summary["config"]["goodput"]:
        notes.append("goodput: req/s meeting " + ", ".join(f"{k} <= {v:g} ms" for k, v in
                                                           summary["config"]["goodput"].items()) + ".")
    for sk in summary.get("skipped", []):
        notes.append(f"skipped c={sk['concurrency']} in={sk['prompt_tokens']} out={sk['output_tokens']}: "
                     f"{sk['reason']}")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def write_png(summary: dict[str, Any], path: Path) -> bool:
    """The report's six charts as one PNG; False when matplotlib is not installed."""
    try:
        mpl = importlib.import_module("matplotlib")
    except ImportError:
        return False
    mpl.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")
    specs = chart_specs(summary["shapes"])
    fig, axes = plt.subplots(2, 3, figsize=(19, 8.5))
    for ax, spec in zip(axes.flat, specs, strict=False):
        for label, points in spec.series:
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
        if spec.logx:
            ax.set_xscale("log", base=2)
        ticks = sorted({x for _, pts in spec.series for x, _ in pts})
        ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
        ax.minorticks_off()
        ys = [y for _, pts in spec.series for _, y in pts]
        ax.set_ylim(0, max(ys, default=1.0) * 1.1 or 1.0)
        ax.set_title(spec.title)
        ax.set_xlabel(spec.xlabel)
        ax.set_ylabel(spec.ylabel)
        ax.grid(True, alpha=0.3)
        if spec.series:
            ax.legend(fontsize=8)
    fig.suptitle(f"tokengate bench: {summary['config']['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_reports(out_dir: Path, summary: dict[str, Any], request_log: list[bytes]) -> list[Path]:
    """Write every report file; returns the paths written (no PNG without matplotlib)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    page = render_html(summary, table_columns(), table_rows(summary["shapes"]))
    files = {"results.json": orjson.dumps(summary, option=orjson.OPT_INDENT_2),
             "results.md": render_table(summary).encode(), "report.html": page.encode(),
             "requests.jsonl": b"".join(request_log)}
    written = []
    for name, data in files.items():
        (out_dir / name).write_bytes(data)
        written.append(out_dir / name)
    png = out_dir / "report.png"
    if write_png(summary, png):
        written.append(png)
    else:
        png.unlink(missing_ok=True)  # an earlier run's, into the same directory: not this run's charts
    return written
