"""``tokengate bench``: load-test any OpenAI-compatible server over a grid of batch shapes.

    tokengate bench --url URL --model M [--concurrency 1,8,32,128] [--prompt-tokens 128,1024,8192]
                    [--output-tokens 64,256] [--duration S | --requests N] [--request-rate R]
                    [--goodput ttft:500ms,tpot:50ms] [--api-key K] [--out DIR] [--tokenizer PATH]
                    [--chat | --completions] [--ignore-eos | --no-ignore-eos] [--no-progress] [--json]

Each shape (concurrency × prompt tokens × output tokens) runs for ``--duration`` seconds (default 20) or
``--requests`` requests; closed loop, or Poisson arrivals with ``--request-rate`` (concurrency then caps the
requests in flight).  Results go to ``--out`` (default ``bench-results/<timestamp>/``): results.json, results.md,
report.html (self-contained) and report.png (with matplotlib).  Exit status: 0 done; 1 a shape in which no
request succeeded, a server that refuses the model or key, or nothing listening at the URL; 2 bad input; 130
interrupted (the shapes finished so far are still written).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import sys
import time
from collections.abc import Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import httpx
import orjson

from . import __version__
from .loadtest.client import Driver, Endpoint, Progress
from .loadtest.report import (
    BRIEF,
    PNG_HINT,
    parse_goodput,
    render_table,
    request_lines,
    series,
    summarize_shape,
    write_reports,
)
from .loadtest.shapes import (
    Counter,
    PromptSet,
    Shape,
    body_factory,
    build_prompts,
    choose_counter,
    fetch_model_info,
    parse_int_list,
    prompt_words,
    shape_grid,
)

DEFAULT_DURATION = 20.0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
# a probe answered with these: the model or the key is wrong, and every request of the grid would be too
_REFUSED = ("http_401", "http_403", "http_404")


def _int_list(text: str) -> list[int]:
    try:
        return parse_int_list(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"want comma-separated positive integers, e.g. 1,8,32 ({exc})") from None


def _goodput(text: str) -> dict[str, float]:
    try:
        return parse_goodput(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_bench_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``bench``; it sets ``func(args) -> int``."""
    p = subparsers.add_parser(
        "bench", help="load-test an OpenAI-compatible endpoint over batch shapes",
        description="Measure TTFT, TPOT, ITL, E2E, throughput and goodput for every combination of concurrency, "
                    "prompt length and output length, against tokengate, vLLM or any OpenAI-compatible server.")
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8080 (a trailing /v1 is fine)")
    p.add_argument("--model", required=True, help="model name to request")
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--concurrency", type=_int_list, default=[1, 8, 32, 128], metavar="LIST",
                   help="requests in flight (default 1,8,32,128)")
    p.add_argument("--prompt-tokens", type=_int_list, default=[128, 1024, 8192], metavar="LIST",
                   help="prompt lengths in tokens (default 128,1024,8192; 1k = 1024)")
    p.add_argument("--output-tokens", type=_int_list, default=[64, 256], metavar="LIST",
                   help="max_tokens of every request (default 64,256)")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--duration", type=float, metavar="S",
                      help=f"seconds per shape (default {DEFAULT_DURATION:g}); requests in flight then finish")
    stop.add_argument("--requests", type=int, metavar="N", help="requests per shape")
    p.add_argument("--request-rate", type=float, metavar="R",
                   help="open loop: Poisson arrivals at R req/s ('inf': all at once); default closed loop")
    p.add_argument("--goodput", type=_goodput, metavar="SLOS",
                   help="SLOs for goodput, e.g. ttft:500ms,tpot:50ms,e2e:10s (bare numbers are ms)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="local model dir with tokenizer.json, for exact prompt lengths (default: the model's root "
                        "from /v1/models if it exists here, else the server's /tokenize, else an estimate)")
    api = p.add_mutually_exclusive_group()
    api.add_argument("--chat", dest="chat", action="store_true", default=True,
                     help="POST /v1/chat/completions (default)")
    api.add_argument("--completions", dest="chat", action="store_false", help="POST /v1/completions")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="send ignore_eos (vLLM's extension) so every answer is exactly --output-tokens long "
                        "(default on; --no-ignore-eos for servers that reject unknown fields)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S", help="per request (default 600)")
    p.add_argument("--seed", type=int, default=0, help="prompt text and arrival times (default 0)")
    p.add_argument("--out", type=Path, metavar="DIR", help="where reports go (default bench-results/<timestamp>/)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress line on stderr")
    p.add_argument("--json", action="store_true", help="print the JSON summary to stdout instead of the table")
    p.set_defaults(func=cmd_bench)


class _ProgressLine:
    """One updating line on a terminal; one line per finished shape otherwise."""

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.stream, self.enabled, self.tty = stream, enabled, stream.isatty()

    def show(self, head: str, p: Progress, goal: int | None, duration: float | None, final: bool) -> None:
        if not self.enabled or not (final or self.tty):
            return
        elapsed = time.perf_counter() - p.started if p.started else 0.0
        frac = p.done / goal if goal else min(elapsed / duration, 1.0) if duration else 0.0
        frac = 1.0 if final else frac
        bar = "#" * int(frac * 24)
        rate = p.tokens / elapsed if elapsed > 0 else 0.0
        line = (f"{head} [{bar:<24}] {frac:4.0%} {p.done} done {p.failed} err {p.in_flight} in flight "
                f"{rate:,.0f} tok/s {elapsed:.1f}s")
        self.stream.write(("\r" + line.ljust(118) if self.tty else line) + ("\n" if final or not self.tty else ""))
        self.stream.flush()


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency where it exists
            asyncio.run(coro)
        else:
            uvloop.run(coro)
    finally:
        coro.close()  # (a Ctrl-C before the loop started it: no "never awaited" warning on the way out)


def _check_numbers(args: argparse.Namespace) -> None:
    if args.requests is not None and args.requests < 1:
        raise ValueError("--requests must be at least 1")
    if args.duration is not None and not (math.isfinite(args.duration) and args.duration > 0):
        raise ValueError("--duration must be a positive number of seconds")
    if args.request_rate is not None and not args.request_rate > 0:  # (nan fails too; inf is "all at once")
        raise ValueError("--request-rate must be positive (or inf)")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise ValueError("--timeout must be a positive number of seconds")


def _rate_label(rate: float | None) -> float | str | None:
    """The rate as JSON can hold it: ``inf`` as the string vLLM's own results use."""
    return "inf" if rate == math.inf else rate


def _mode(rate: float | None) -> str:
    if rate is None:
        return "closed loop"
    if rate == math.inf:
        return "all at once (request rate inf), in flight capped by concurrency"
    return f"open loop, Poisson arrivals at {rate:g} req/s"


def _out_dir(args: argparse.Namespace) -> Path:
    """``--out``, or a new ``bench-results/<timestamp>[-N]/`` (two runs started in the same second don't mix)."""
    if args.out is not None:
        return Path(args.out)
    base = Path("bench-results") / datetime.now().strftime("%Y%m%d-%H%M%S")
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def _make_out_dir(out: Path) -> bool:
    """Create ``--out`` before the first request (a bad one must not cost a whole run); True if it is new."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(20, "exists and is not a directory")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(13, "not writable")
    if (out / "results.json").exists():
        print(f"tokengate bench: {out} holds an earlier run's reports: this run's replace them", file=sys.stderr)
    return created


def _prompts_of(prompts: dict[int, PromptSet | str], n: int) -> PromptSet:
    ps = prompts[n]
    assert isinstance(ps, PromptSet)  # (only runnable lengths were sent)
    return ps


def _error_lines(shape: dict[str, Any]) -> list[str]:
    return [f"    {n} × {kind}: {shape['error_samples'].get(kind, '')}"[:200] for kind, n in shape["errors"].items()]


def _prepare(args: argparse.Namespace, endpoint: Endpoint) -> tuple[Counter, dict[int, PromptSet | str], Any]:
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(headers=headers, timeout=30.0) as client:
        info = fetch_model_info(client, endpoint.base_url, args.model)
        counter = choose_counter(client, endpoint.base_url, args.model, chat=args.chat, tokenizer=args.tokenizer,
                                 info=info)
        words = prompt_words(counter)
        prompts: dict[int, PromptSet | str] = {}
        for n in args.prompt_tokens:
            try:
                prompts[n] = build_prompts(n, counter, words, seed=args.seed)
            except (ValueError, KeyError, TypeError, httpx.HTTPError) as exc:
                prompts[n] = f"{type(exc).__name__}: {exc}"
    return counter, prompts, info


def cmd_bench(args: argparse.Namespace) -> int:
    err = sys.stderr
    try:
        endpoint = Endpoint.parse(args.url, chat=args.chat, api_key=args.api_key)
        _check_numbers(args)
        counter, prompts, info = _prepare(args, endpoint)
    except (ValueError, FileNotFoundError) as exc:
        print(f"tokengate bench: {exc}", file=err)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("\ntokengate bench: interrupted before the first shape; nothing written", file=err)
        return EXIT_INTERRUPTED
    duration = args.duration if args.duration is not None or args.requests is not None else DEFAULT_DURATION
    runnable: list[tuple[Shape, PromptSet]] = []
    skipped: list[dict[str, Any]] = []
    for shape in shape_grid(args.concurrency, args.prompt_tokens, args.output_tokens):
        ps = prompts[shape.prompt_tokens]
        total = shape.prompt_tokens + shape.output_tokens
        reason = ps if isinstance(ps, str) else None
        if reason is None and info.max_model_len is not None and total > info.max_model_len:
            reason = f"{total} tokens exceed the server's max_model_len {info.max_model_len}"
        if reason is None:
            assert isinstance(ps, PromptSet)
            runnable.append((shape, ps))
        else:
            skipped.append({"concurrency": shape.concurrency, "prompt_tokens": shape.prompt_tokens,
                            "output_tokens": shape.output_tokens, "reason": reason})
    if not runnable:
        print("tokengate bench: no shape can run:\n  " + "\n  ".join(sorted({s["reason"] for s in skipped})), file=err)
        return EXIT_BAD_INPUT
    out_dir = _out_dir(args)
    try:
        created = _make_out_dir(out_dir)
    except OSError as exc:
        print(f"tokengate bench: --out {out_dir}: {exc.strerror or exc}", file=err)
        return EXIT_BAD_INPUT
    sets = [p for p in prompts.values() if isinstance(p, PromptSet)]
    exact = counter.exact and all(p.stable and p.measured == p.target for p in sets)
    summary: dict[str, Any] = {
        "tool": f"tokengate bench {__version__}", "started_at": datetime.now().astimezone().isoformat(),
        "config": {"url": args.url, "endpoint": f"{endpoint.host}:{endpoint.port}{endpoint.path}",
                   "model": args.model, "api": "chat" if args.chat else "completions",
                   "mode": _mode(args.request_rate),
                   "concurrency": args.concurrency, "prompt_tokens": args.prompt_tokens,
                   "output_tokens": args.output_tokens, "duration_s": None if args.requests else duration,
                   "requests": args.requests, "request_rate": _rate_label(args.request_rate),
                   "goodput": {k: v * 1000 for k, v in (args.goodput or {}).items()}, "ignore_eos": args.ignore_eos,
                   "timeout_s": args.timeout, "seed": args.seed},
        "prompts": {"source": counter.source, "exact": exact, "tokenizer": str(getattr(counter, "path", "")) or None,
                    "measured": {str(p.target): p.measured for p in sets},
                    "distinct": {str(p.target): p.distinct for p in sets},
                    "note": None if exact else "prompt lengths are approximate; the table shows the server's counts"},
        "server": {"max_model_len": info.max_model_len, "root": info.root},
        "shapes": [], "skipped": skipped,
    }
    if args.requests is not None and any(c > args.requests for c in args.concurrency):
        over = ", ".join(str(c) for c in args.concurrency if c > args.requests)
        print(f"tokengate bench: warning: --requests {args.requests} is below concurrency {over}: those shapes "
              f"have at most {args.requests} requests in flight", file=err)
    log: list[bytes] = []
    bar = _ProgressLine(err, args.progress)
    status = {"connected": True, "interrupted": False}

    start = int.from_bytes(os.urandom(6), "big")  # the first prompt of each length: a re-run sends others
    sent: dict[int, int] = {}  # prompt length → prompts used so far: each shape goes on from there

    async def run_all() -> None:
        me = asyncio.current_task()
        assert me is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, me.cancel)  # a kill saves what finished
        first_shape, first_prompts = runnable[0]
        probe = Driver(endpoint, body_factory(first_prompts, model=args.model, output_tokens=2, chat=args.chat,
                                              ignore_eos=args.ignore_eos, first=start - 1), timeout=args.timeout)
        rec = (await probe.run(concurrency=1, requests=1)).records[0]
        if rec.error == "connect":
            status["connected"] = False
            print(f"tokengate bench: cannot connect to {args.url}: {rec.detail}", file=err)
            return
        if rec.error in _REFUSED:  # every request would get the same answer: say so now, not after the grid
            status["connected"] = False
            print(f"tokengate bench: the server refused the probe request ({rec.error}: {rec.detail}); check "
                  "--model (GET /v1/models lists what it serves) and --api-key", file=err)
            return
        if not rec.ok:
            print(f"tokengate bench: warning: the probe request failed ({rec.error}: {rec.detail})", file=err)
        if not exact:  # (said once the server answered: an unreachable one is why nothing could count)
            print(f"tokengate bench: prompts by {counter.source}: lengths are approximate "
                  "(--tokenizer PATH makes them exact)", file=err)
        for n, (shape, ps) in enumerate(runnable, 1):
            progress = Progress()
            used = sent.get(shape.prompt_tokens, 0)
            driver = Driver(endpoint, body_factory(ps, model=args.model, output_tokens=shape.output_tokens,
                                                   chat=args.chat, ignore_eos=args.ignore_eos, first=start + used),
                            timeout=args.timeout, progress=progress)
            head = f"[{n}/{len(runnable)}] {shape.label}"
            task = asyncio.ensure_future(driver.run(concurrency=shape.concurrency, requests=args.requests,
                                                    duration=None if args.requests else duration,
                                                    rate=args.request_rate, seed=args.seed + n))
            while not task.done():
                bar.show(head, progress, args.requests, duration, final=False)
                await asyncio.wait([task], timeout=0.25)
            run = task.result()
            sent[shape.prompt_tokens] = used + len(run.records)
            bar.show(head, progress, args.requests, duration, final=True)
            shape_summary = summarize_shape(shape, run, slos=args.goodput, rate=_rate_label(args.request_rate))
            if args.requests is not None:
                shape_summary["max_concurrency"] = min(shape.concurrency, args.requests)
            summary["shapes"].append(shape_summary)
            log.extend(request_lines(shape, run))
            if shape_summary["failed"]:
                print(f"tokengate bench: {shape.label}: {shape_summary['failed']} of {shape_summary['requests']} "
                      "requests failed:", *_error_lines(shape_summary), sep="\n", file=err)

    try:
        _run(run_all())
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C, or SIGTERM (run_all's handler)
        status["interrupted"] = True
        print("\ntokengate bench: interrupted; writing the shapes finished so far", file=err)
    if not status["connected"]:
        if created:
            out_dir.rmdir()  # (nothing in it)
        return EXIT_FAILED
    summary["finished_at"] = datetime.now().astimezone().isoformat()
    summary["series"] = series(summary["shapes"])
    repeated = {n: used for n, used in sent.items() if used > _prompts_of(prompts, n).distinct}
    if repeated:
        summary["prompts"]["repeated"] = {str(n): used for n, used in repeated.items()}
        print("tokengate bench: warning: prompts repeated, so a prefix cache may have served some (this tokenizer "
              "has few one-token words for the nonce): " + ", ".join(
                  f"{used} requests of {n} tokens, {_prompts_of(prompts, n).distinct} distinct prompts"
                  for n, used in repeated.items()), file=err)
    try:
        files = write_reports(out_dir, summary, log)
    except OSError as exc:
        print(f"tokengate bench: could not write the reports to {out_dir}: {exc}; the results follow as JSON",
              file=err)
        sys.stdout.write(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode() + "\n")
        return EXIT_FAILED
    if args.json:
        sys.stdout.write(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(render_table(summary, BRIEF))  # (the files have p90 and p95 too)
        print("wrote " + ", ".join(str(f) for f in files))
    if not any(f.name == "report.png" for f in files):
        print(f"tokengate bench: {PNG_HINT}", file=err)
    if status["interrupted"]:
        return EXIT_INTERRUPTED
    empty = [f"c={s['concurrency']} in={s['prompt_tokens']} out={s['output_tokens']}" for s in summary["shapes"]
             if not s["completed"]]
    if empty:
        print(f"tokengate bench: no request succeeded in {len(empty)} of {len(summary['shapes'])} shapes "
              f"({', '.join(empty[:8])}{', ...' if len(empty) > 8 else ''}): see the errors above", file=err)
        return EXIT_FAILED
    return 0
