"""The self-contained HTML report: inline SVG charts of TTFT and throughput against concurrency and prompt length.

No scripts, stylesheets or fonts from elsewhere, so the file can be mailed or attached to a ticket as it is.  The
same ``chart_specs`` feed ``report.write_png`` when matplotlib is installed.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any

_W, _H = 600, 340
_L, _R, _T, _B = 70, 150, 34, 46
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22")


@dataclass(frozen=True, slots=True)
class ChartSpec:
    title: str
    xlabel: str
    ylabel: str
    series: list[tuple[str, list[tuple[float, float]]]]
    logx: bool = True


def _collect(shapes: list[dict[str, Any]], key: Any, x: str, label: Any) -> list[tuple[str, list[tuple[float, float]]]]:
    groups: dict[str, list[tuple[float, float]]] = {}
    for s in shapes:
        y = key(s)
        if y is not None:
            groups.setdefault(label(s), []).append((float(s[x]), float(y)))
    return [(name, sorted(points)) for name, points in groups.items()]


def chart_specs(shapes: list[dict[str, Any]]) -> list[ChartSpec]:
    def io(s: dict[str, Any]) -> str:
        return f"in={s['prompt_tokens']} out={s['output_tokens']}"

    def co(s: dict[str, Any]) -> str:
        return f"c={s['concurrency']} out={s['output_tokens']}"

    def speed(s: dict[str, Any]) -> float | None:
        t = s["tpot_ms"]["p50"]
        return 1000.0 / t if t else None

    return [
        ChartSpec("Time to first token (p50) vs concurrency", "concurrency", "TTFT p50 (ms)",
                  _collect(shapes, lambda s: s["ttft_ms"]["p50"], "concurrency", io)),
        ChartSpec("Output throughput vs concurrency", "concurrency", "output tokens/s (all requests)",
                  _collect(shapes, lambda s: s["output_throughput"] if s["completed"] else None, "concurrency", io)),
        ChartSpec("Decode speed per request vs concurrency", "concurrency", "tokens/s per request (1/TPOT p50)",
                  _collect(shapes, speed, "concurrency", io)),
        ChartSpec("Time to first token (p50) vs prompt length", "prompt tokens", "TTFT p50 (ms)",
                  _collect(shapes, lambda s: s["ttft_ms"]["p50"], "prompt_tokens", co)),
        ChartSpec("Output throughput vs prompt length", "prompt tokens", "output tokens/s (all requests)",
                  _collect(shapes, lambda s: s["output_throughput"] if s["completed"] else None, "prompt_tokens",
                           co)),
        ChartSpec("Decode speed per request vs prompt length", "prompt tokens", "tokens/s per request (1/TPOT p50)",
                  _collect(shapes, speed, "prompt_tokens", co)),
    ]


def _nice_max(v: float) -> tuple[float, float]:
    """An axis top at or above v and a tick step (1, 2 or 5 × 10^k, about five ticks)."""
    if v <= 0:
        return 1.0, 0.2
    raw = v / 5
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return step * math.ceil(v / step), step


def _label(v: float) -> str:
    return f"{v / 1000:g}k" if v >= 10000 else f"{v:g}"


def svg_chart(spec: ChartSpec) -> str:
    """One line chart as an inline ``<svg>`` element."""
    e = html.escape
    parts = [f'<svg viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" aria-label="{e(spec.title)}">',
             f'<text x="{_L}" y="20" class="t">{e(spec.title)}</text>']
    points = [p for _, pts in spec.series for p in pts]
    if not points:
        parts.append(f'<text x="{_L + 20}" y="{_H // 2}">no data</text></svg>')
        return "".join(parts)
    xs = sorted({p[0] for p in points})
    fx = (lambda v: math.log2(v)) if spec.logx and xs[0] > 0 else (lambda v: v)
    x0, x1 = fx(xs[0]), fx(xs[-1])
    top, step = _nice_max(max(p[1] for p in points) * 1.05)
    pw, ph = _W - _L - _R, _H - _T - _B

    def px(v: float) -> float:
        return _L + (pw / 2 if x1 == x0 else (fx(v) - x0) / (x1 - x0) * pw)

    def py(v: float) -> float:
        return _T + ph - v / top * ph

    for i in range(round(top / step) + 1):
        y = py(i * step)
        parts.append(f'<line x1="{_L}" x2="{_L + pw}" y1="{y:.1f}" y2="{y:.1f}" class="g"/>'
                     f'<text x="{_L - 6}" y="{y + 4:.1f}" class="yl">{_label(i * step)}</text>')
    for v in xs:
        parts.append(f'<text x="{px(v):.1f}" y="{_T + ph + 16}" class="xl">{_label(v)}</text>')
    parts.append(f'<line x1="{_L}" x2="{_L + pw}" y1="{_T + ph}" y2="{_T + ph}" class="a"/>'
                 f'<text x="{_L + pw / 2}" y="{_H - 8}" class="xl">{e(spec.xlabel)}</text>'
                 f'<text transform="translate(16 {_T + ph / 2}) rotate(-90)" class="xl">{e(spec.ylabel)}</text>')
    for i, (name, pts) in enumerate(spec.series):
        color = _COLORS[i % len(_COLORS)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y in pts:
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{color}">'
                         f'<title>{e(name)}: {_label(x)} → {y:,.1f}</title></circle>')
        ly = _T + 4 + i * 17
        parts.append(f'<rect x="{_W - _R + 8}" y="{ly}" width="12" height="4" fill="{color}"/>'
                     f'<text x="{_W - _R + 24}" y="{ly + 6}" class="lg">{e(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def findings(summary: dict[str, Any]) -> list[str]:
    """Plain-language reading of the series: where one server saturates and what more GPUs would buy."""
    out = []
    for s in summary.get("series", []):
        name = f"in={s['prompt_tokens']} out={s['output_tokens']}"
        if s["saturation_concurrency"] is not None:
            out.append(f"{name}: output throughput stops growing past concurrency {s['saturation_concurrency']} "
                       f"(peak {s['peak_output_throughput']:,.0f} tok/s at {s['peak_at_concurrency']}). Beyond "
                       "that, more load only queues and TTFT climbs: add replicas (data parallel) to serve more.")
        else:
            out.append(f"{name}: throughput still grows at the highest concurrency tried "
                       f"({s['peak_output_throughput']:,.0f} tok/s): one server has headroom left.")
        if s["best_goodput"] is not None:
            out.append(f"{name}: best goodput {s['best_goodput']:.2f} req/s at concurrency "
                       f"{s['best_goodput_concurrency']}.")
    single = sorted((s["prompt_tokens"], s["ttft_ms"]["p50"]) for s in summary["shapes"]
                    if s["concurrency"] == min(x["concurrency"] for x in summary["shapes"]) and s["ttft_ms"]["p50"])
    if len(single) >= 2 and single[0][1] > 0:
        (p0, t0), (p1, t1) = single[0], single[-1]
        if t1 / t0 >= 1.5:
            out.append(f"Unloaded TTFT grows {t1 / t0:.1f}× from {p0} to {p1} prompt tokens ({t0:,.0f} → {t1:,.0f} "
                       "ms). If long prompts miss your TTFT target even alone, prefill is the limit: tensor "
                       "parallelism (more GPUs per replica) shortens it; replicas do not.")
        else:
            out.append(f"Unloaded TTFT hardly changes from {p0} to {p1} prompt tokens ({t0:,.0f} → {t1:,.0f} ms): "
                       "prefill is not the limit at these lengths.")
    return out


_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222;max-width:1300px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}table{border-collapse:collapse;font-size:12px}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}th{background:#f4f4f4}
.charts{display:flex;flex-wrap:wrap;gap:12px}svg{background:#fff;border:1px solid #e4e4e4}
svg .t{font-weight:600;font-size:13px}svg text{font-size:11px;fill:#333}svg .xl{text-anchor:middle}
svg .yl{text-anchor:end}svg .g{stroke:#eee}svg .a{stroke:#999}.note{color:#555}code{background:#f4f4f4}"""


def render_html(summary: dict[str, Any], columns: list[str], table: list[list[str]]) -> str:
    """The whole report page; ``columns``/``table`` are the per-shape table as text cells."""
    e = html.escape
    cfg, prompts = summary["config"], summary["prompts"]
    meta = [("model", cfg["model"]), ("endpoint", cfg["endpoint"]), ("started", summary["started_at"]),
            ("mode", cfg["mode"]), ("prompts", prompts["source"] + ("" if prompts["exact"] else " (estimated)")),
            ("ignore_eos", str(cfg["ignore_eos"])), ("max_model_len", str(summary["server"]["max_model_len"]))]
    if cfg["goodput"]:
        meta.append(("goodput SLOs", ", ".join(f"{k} ≤ {v:g} ms" for k, v in cfg["goodput"].items())))
    rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in table)
    errors = [(s, k, n) for s in summary["shapes"] for k, n in s["errors"].items()]
    body = [
        f"<h1>tokengate bench — {e(cfg['model'])}</h1>",
        "<table>" + "".join(f"<tr><th>{e(k)}</th><td style='text-align:left'>{e(str(v))}</td></tr>"
                            for k, v in meta) + "</table>",
        "<h2>What it says</h2><ul>" + "".join(f"<li>{e(f)}</li>" for f in findings(summary)) + "</ul>",
        "<p class='note'>Rule of thumb: where output throughput flattens while TTFT rises, one server is full and "
        "more GPUs as replicas pay off; where TTFT at concurrency 1 is already too high for long prompts, more GPUs "
        "per replica (tensor parallel) pay off.</p>",
        "<h2>Charts</h2><div class='charts'>" + "".join(svg_chart(c) for c in chart_specs(summary["shapes"]))
        + "</div>",
        "<h2>All shapes</h2><p class='note'>Times in ms (p50/p99); throughput per second; TTFT, TPOT, ITL and E2E "
        "as vLLM <code>bench serve</code> defines them. results.json has mean, p90 and p95 too.</p>",
        "<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in columns) + f"</tr>{rows}</table>",
    ]
    if errors:
        body.append("<h2>Errors</h2><table><tr><th>shape</th><th>kind</th><th>count</th><th>sample</th></tr>"
                    + "".join(f"<tr><td>c={s['concurrency']} in={s['prompt_tokens']} out={s['output_tokens']}</td>"
                              f"<td>{e(k)}</td><td>{n}</td><td style='text-align:left'>"
                              f"{e(s['error_samples'].get(k, ''))}</td></tr>" for s, k, n in errors) + "</table>")
    for sk in summary.get("skipped", []):
        body.append(f"<p class='note'>Skipped c={sk['concurrency']} in={sk['prompt_tokens']} "
                    f"out={sk['output_tokens']}: {e(sk['reason'])}</p>")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>tokengate bench — "
            f"{e(cfg['model'])}</title><style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")
