"""Side by side, in one run: the same fast fake worker behind four arms, measured in interleaved rounds.

Arms: ``direct`` (client -> worker), ``tokengate`` (``tokengate serve --upstream``), ``vllm-router`` (the Rust
router) and ``litellm`` (LiteLLM proxy); the peers run from their own venvs (``bench/peers.py``).  Pinning: the
gateways on CPU 0 (taskset), the load client (this process, sched_setaffinity) and the fake worker on CPU 1;
``RLIMIT_NOFILE`` raised to the hard limit everywhere.  One worker and one process per gateway per regime; every
arm is up during every round, so idle arms share CPU 0 (their CPU is recorded as ``others_cpu_s``).

Regimes, each for ``stream: true`` and ``false``:
  (a) paced worker (20 ms to first token, 10 ms/token, 64 tokens), closed loop at each ``--concurrency``:
      warm-up, then ``--rounds`` rounds, arm order rotated per round (A B C D, B C D A, ...).  Added TTFT and e2e
      (arm percentile - direct percentile, pooled over rounds), gateway CPU-seconds per 1000 requests.  At c > 1
      each round runs ``--lead-in`` seconds before its measured window: every stream sends its first request in
      the same instant, after the other arms' rounds (long enough for keep-alive timeouts to close connections),
      and streams of equal length stay in lock-step for a few rounds of requests — a start-up transient of the
      harness, not the steady state of C concurrent streams.
  (b) zero-delay worker, 16 tokens: closed loop at ``--sat-concurrency`` (req/s ratio to direct), then an
      open-loop Poisson sweep: rates ``--sweep-start`` x ``--sweep-factor``^k; at each rate direct runs first
      (the reference: it must hold too, and the client keep to its schedule: send lag p50 <= 2 ms), then each
      arm still in the race, each step a short warm-up then the measured run on the warmed connections.  An arm
      holds a rate with >= 99.9 % success and p99 TTFT (from the scheduled arrival) within ``--added-p99-ms`` of
      direct's; a failure is retried once against a fresh reference; then the gap between the last held and the
      first failed rate is bisected (one look at factor^2 below when the first rate fails).

LiteLLM is ~100x slower than the others: its rounds stop after ``--litellm-requests`` requests (never fewer than
the concurrency) and it runs up to ``--litellm-max-concurrency`` only, so it does not dominate the run time.
``--tokengate-rev REV`` measures a commit (``git archive``) instead of the working tree.

    python -m bench.compare                        # full run, ~15 min; writes bench/results/compare.{md,json,png}
    python -m bench.compare --quick                # ~2 min smoke run into bench/results/raw/quick/
    python -m bench.compare --arms direct,tokengate --regimes saturation --modes stream
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import peers
from bench.compare_report import ArmRun, RawWriter, analyse_cell, judge, machine, open_summary, write_outputs
from bench.compare_stack import REGIMES, Stack, client_cpu, cpu_probe, launch, sanity
from bench.loadclient import (
    Connection,
    LoadResult,
    Target,
    chat_body,
    close_pool,
    run_closed,
    run_open,
)
from bench.overhead import Regime, raise_nofile

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("direct", "tokengate", "vllm-router", "litellm")
MODES = ("stream", "nonstream")
Hooks = tuple[Callable[[], None], Callable[[], None]]  # (window opens, window closes)


async def _bracketed(hooks: Hooks, run: Awaitable[LoadResult]) -> LoadResult:
    """A run without a measured window of its own (the open loop): the window is the whole run."""
    hooks[0]()
    res = await run
    hooks[1]()
    return res


class Bench:
    def __init__(self, a: argparse.Namespace, raw: RawWriter, say: Callable[[str], None]) -> None:
        self.a = a
        self.raw = raw
        self.say = say

    def _body(self, reg: Regime, mode: str) -> dict[str, Any]:
        return chat_body(max_tokens=reg.tokens, stream=mode == "stream", include_usage=self.a.include_usage)

    def _cap(self, arm: str, conc: int) -> int | None:
        return max(conc, self.a.litellm_requests) if arm == "litellm" else None

    async def _measured(self, stack: Stack, arm: str, start: Callable[[Hooks], Awaitable[LoadResult]]
                        ) -> tuple[LoadResult, dict[str, float]]:
        """Run ``start(hooks)``; the hooks read the CPU counters as the run's measured window opens and closes."""
        pids = stack.pids()
        read = cpu_probe(pids)
        marks: list[tuple[float, dict[str, float]]] = []

        def mark() -> None:
            marks.append((client_cpu(), read()))

        res = await start((mark, mark))
        (c0, t0), (c1, t1) = marks
        scale = res.window_scale  # a closed loop's window: its CPU, per request at the loop's rate
        d = {k: (t1[k] - t0[k]) * scale for k in t0 if k in t1}
        c1 = c0 + (c1 - c0) * scale
        gws = [k for k in pids if k != "worker"]
        g, w = f"cpu{self.a.gateway_cpu}", f"cpu{self.a.client_cpu}"
        cpu = {"gateway": d.get(f"{arm}:ns", 0.0), "gateway_ticks": d.get(arm, 0.0), "worker": d["worker"],
               "client": c1 - c0, "others": sum(d[k] for k in gws if k != arm),
               # what the rest of the machine ran on the two benchmark CPUs meanwhile (tick resolution)
               "foreign_gateway_cpu": max(0.0, d.get(g, 0.0) - sum(d[k] for k in gws)),
               "foreign_client_cpu": max(0.0, d.get(w, 0.0) - d["worker"] - (c1 - c0))}
        return res, cpu

    def _round_seconds(self, reg: Regime, conc: int, seconds: float) -> float:
        """c=1 on the paced worker: rounds of at least ``--min-round-requests`` request durations (else ~2 a round)."""
        latency = reg.ttft + (reg.tokens - 1) * reg.token_delay
        return max(seconds, self.a.min_round_requests * latency) if conc == 1 else seconds

    async def closed_cell(self, stack: Stack, mode: str, conc: int, seconds: float) -> dict[str, Any]:
        a = self.a
        arms = [x for x in stack.arms if not (x == "litellm" and conc > a.litellm_max_concurrency)]
        seconds = self._round_seconds(stack.regime, conc, seconds)
        # one stream has no synchronised start to leave out; LiteLLM's capped rounds (too slow to matter) have none
        lead_in = a.lead_in if conc > 1 else 0.0
        targets = {arm: Target.build(stack.urls[arm], self._body(stack.regime, mode)) for arm in arms}
        pools: dict[str, list[Connection]] = {arm: [] for arm in arms}  # keep-alive across rounds
        for arm in arms:  # LiteLLM: one request per connection is warm-up enough
            await run_closed(targets[arm], concurrency=conc, duration=a.warmup_seconds,
                             requests=conc if arm == "litellm" else None, pool=pools[arm], timeout=a.timeout)
        runs = {arm: ArmRun() for arm in arms}
        label = (stack.regime.name, mode, f"c={conc}")
        for i in range(a.rounds):
            order = arms[i % len(arms):] + arms[: i % len(arms)]
            for arm in order:
                cap = self._cap(arm, conc)
                def start(hooks: Hooks, arm: str = arm, cap: int | None = cap) -> Awaitable[LoadResult]:
                    return run_closed(targets[arm], concurrency=conc, duration=seconds, requests=cap,
                                      pool=pools[arm], timeout=a.timeout, lead_in=0.0 if cap else lead_in,
                                      on_window=hooks[0], on_close=hooks[1])

                res, cpu = await self._measured(stack, arm, start)
                runs[arm].add(res, cpu)
                self.raw.write(*label, arm, i, res.records)
            self.say(f"    round {i + 1}/{a.rounds}: " + "  ".join(
                f"{arm} {runs[arm].rounds[-1]['rps']:.0f}/s p50 {runs[arm].rounds[-1]['ttft_p50_ms']:.1f}ms"
                for arm in arms))
        for pool in pools.values():
            close_pool(pool)
        skipped = {x: f"c > --litellm-max-concurrency {a.litellm_max_concurrency}" for x in stack.arms
                   if x not in arms}
        return {"regime": stack.regime.name, "mode": mode, "concurrency": conc, "round_seconds": seconds,
                "skipped": skipped, "arms": analyse_cell(runs)}

    async def _open(self, stack: Stack, arm: str, target: Target, rate: float,
                    label: tuple[str, str]) -> dict[str, Any]:
        """One open-loop step: a short warm-up at ``rate`` (to open the connections), then the measured run on the
        same connections.  The seed depends on the rate only: every arm sees the same arrival times."""
        a = self.a
        pool: list[Connection] = []
        await run_open(target, rate=rate, duration=a.sweep_warmup, timeout=a.sweep_timeout, seed=1, pool=pool)
        dur = max(a.sweep_seconds, a.sweep_min_requests / rate)
        res, cpu = await self._measured(stack, arm, lambda hooks: _bracketed(hooks, run_open(
            target, rate=rate, duration=dur, timeout=a.sweep_timeout, seed=int(rate), pool=pool)))
        close_pool(pool)
        self.raw.write(*label, f"rate={rate:g}", arm, 0, res.records)
        return open_summary(res, cpu, arm)

    async def sweep(self, stack: Stack, mode: str) -> dict[str, Any]:
        a = self.a
        targets = {arm: Target.build(stack.urls[arm], self._body(stack.regime, mode)) for arm in stack.arms}
        arms = [arm for arm in stack.arms if arm != "direct"]
        steps: list[dict[str, Any]] = []
        best: dict[str, float | None] = dict.fromkeys(arms)
        fail: dict[str, tuple[float, str] | None] = dict.fromkeys(arms)
        label = ("saturation", mode)
        refs: dict[float, dict[str, Any]] = {}

        def noisy(step: dict[str, Any]) -> bool:  # the rest of the machine took a big share of a benchmark CPU
            return bool(max(step["foreign_gateway_cpu_util"], step["foreign_client_cpu_util"]) > a.max_foreign)

        async def reference(rate: float, fresh: bool = False) -> tuple[dict[str, Any], str | None]:
            """Direct at ``rate``.  The client falling behind its schedule (send lag p50) is the ceiling; a stall
            (lag p99 only) or a busy machine is measured again, up to ``--contention-retries`` times."""
            if rate in refs and not fresh:
                return refs[rate], refs[rate]["why"]
            for _ in range(1 + a.contention_retries):
                ref = await self._open(stack, "direct", targets["direct"], rate, label)
                why, lag = judge(ref, None, a.added_p99_ms), ref["lag_ms"]
                if why is None and lag["p50"] > a.max_lag_p50_ms:
                    why = f"load client behind schedule (send lag p50 {lag['p50']:.1f} ms)"
                elif why is None and lag["p99"] > a.max_lag_p99_ms:
                    why = f"load client stalled (send lag p99 {lag['p99']:.0f} ms)"
                ref["why"], ref["noisy"] = why, noisy(ref)
                steps.append({"rate": rate, "arm": "direct", **ref})
                if why is None or why.startswith("load client behind"):
                    break
            refs[rate] = ref
            return ref, why

        async def attempt(arm: str, rate: float, confirm: int = a.sweep_confirm) -> str | None:
            """None if ``arm`` holds ``rate``.  A failure is retried against a fresh reference ``confirm`` times;
            failures while the machine was busy (``noisy``) do not count, up to ``--contention-retries`` more."""
            why: str | None = None
            counted = tries = 0
            while counted <= confirm and tries <= confirm + a.contention_retries:
                ref, rwhy = await reference(rate, fresh=tries > 0)
                tries += 1
                if rwhy is not None:
                    return f"reference: {rwhy}"
                s = await self._open(stack, arm, targets[arm], rate, label)
                why = judge(s, ref, a.added_p99_ms)
                added = s["ttft_sched_ms"]["p99"] - ref["ttft_sched_ms"]["p99"]
                busy = noisy(s) or noisy(ref)
                steps.append({"rate": rate, "arm": arm, "try": tries, "why": why, "noisy": busy,
                              "added_ttft_p99_ms": round(added, 3), **s})
                if why is None:
                    return None
                counted += not busy
            return why

        ceiling: tuple[float, str] | None = None
        alive, rate = list(arms), a.sweep_start
        while alive and rate <= a.sweep_max:
            _, rwhy = await reference(rate)
            if rwhy is not None:
                ceiling = rate, rwhy
                break
            for arm in list(alive):
                why = await attempt(arm, rate)
                if why is None:
                    best[arm] = rate
                else:
                    fail[arm] = rate, why
                    alive.remove(arm)
            self.say(f"    {rate:8.1f}/s: " + "  ".join(
                f"{arm} {'ok' if best[arm] == rate else 'FAIL' if (fail[arm] or (0,))[0] == rate else '-'}"
                for arm in arms))
            rate *= a.sweep_factor
        for arm in arms:  # bisect (geometrically) between the last held and the first failed rate
            for _ in range(a.sweep_refine):
                f, lo = fail[arm], best[arm]
                if f is None or (lo is not None and f[0] / lo < 1.2):
                    break
                if lo is None:  # the first rate failed already: one look, unconfirmed, at factor^2 below it
                    mid = round(f[0] / a.sweep_factor ** 2, 1)
                    why = await attempt(arm, mid, confirm=0)
                else:
                    mid = round(math.sqrt(lo * f[0]), 1)
                    why = await attempt(arm, mid)
                self.say(f"    refine {arm} {mid:.1f}/s: {'ok' if why is None else 'FAIL: ' + why}")
                if (why is not None and why.startswith("reference")) or (lo is None and why is not None):
                    break
                if why is None:
                    best[arm] = mid
                else:
                    fail[arm] = mid, why
        held = [r for r, s in refs.items() if s["why"] is None]
        out: dict[str, Any] = {"mode": mode, "steps": steps, "ceiling": ceiling, "max": {
            "direct": {"rate": max(held) if held else None, "first_fail": ceiling[0] if ceiling else None,
                       "why": ceiling[1] if ceiling else None}}}
        for arm in arms:
            f = fail[arm]
            out["max"][arm] = {"rate": best[arm], "first_fail": f[0] if f else None, "why": f[1] if f else None}
        return out


async def run_all(a: argparse.Namespace, logdir: Path, raw: RawWriter, say: Callable[[str], None],
                  t_start: float) -> dict[str, Any]:
    bench = Bench(a, raw, say)
    out: dict[str, Any] = {"fixed": [], "saturation": [], "sweep": [], "arms": {}}
    for name in a.regimes:
        reg = REGIMES[name]
        say(f"[{time.monotonic() - t_start:6.0f}s] {reg.name}: {reg.about}; starting {', '.join(a.arms)}")
        stack = launch(reg, a.arms, a, logdir)
        try:
            await sanity(stack, a)
            out["arms"][reg.name] = {"up": stack.arms, "failed": stack.failed,
                                     "cmds": {k: " ".join(v) for k, v in stack.cmds.items()}}
            for arm, why in stack.failed.items():
                say(f"  !! {arm} not measured in {reg.name}: {why}")
            if len(stack.arms) < 1 or "direct" not in stack.arms:
                raise SystemExit("the direct arm is needed as the reference and is not up")
            for mode in a.modes:
                if reg.name == "paced":
                    for conc in a.concurrency:
                        say(f"[{time.monotonic() - t_start:6.0f}s]  paced {mode} c={conc}")
                        out["fixed"].append(await bench.closed_cell(stack, mode, conc, a.round_seconds))
                else:
                    say(f"[{time.monotonic() - t_start:6.0f}s]  saturation {mode} c={a.sat_concurrency}")
                    out["saturation"].append(await bench.closed_cell(stack, mode, a.sat_concurrency, a.sat_seconds))
                    if a.sweep:
                        say(f"[{time.monotonic() - t_start:6.0f}s]  open-loop sweep {mode}")
                        out["sweep"].append(await bench.sweep(stack, mode))
        finally:
            stack.close()
    return out


def _csv(kind: type, text: str) -> list[Any]:
    return [kind(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="tokengate vs direct vs vllm-router vs LiteLLM (see module docstring).")
    p.add_argument("--quick", action="store_true", help="~2 min smoke run: 2 short rounds, c=1,64, a coarse sweep; "
                                                         "writes under bench/results/raw/quick unless --out")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--regimes", default="paced,saturation")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--concurrency", default="1,8,64,256", help="paced regime, closed loop")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--round-seconds", type=float, default=1.5, help="paced regime, per arm per round")
    p.add_argument("--warmup-seconds", type=float, default=1.0)
    p.add_argument("--lead-in", type=float, default=2.0,
                   help="closed loop at c > 1: seconds each round runs before its measured window, so that the "
                        "synchronised start (all streams' first requests at once, after the other arms' rounds, on "
                        "connections an idle timeout may have closed) is not mixed into the steady state")
    p.add_argument("--sat-concurrency", type=int, default=64)
    p.add_argument("--sat-seconds", type=float, default=1.5)
    p.add_argument("--no-sweep", dest="sweep", action="store_false")
    p.add_argument("--sweep-start", type=float, default=100.0)
    p.add_argument("--sweep-factor", type=float, default=2.0)
    p.add_argument("--sweep-max", type=float, default=30000.0)
    p.add_argument("--sweep-seconds", type=float, default=2.0, help="per arm per rate (longer at low rates)")
    p.add_argument("--sweep-min-requests", type=int, default=150)
    p.add_argument("--sweep-warmup", type=float, default=0.3, help="seconds at the rate before each measured step")
    p.add_argument("--max-lag-p50-ms", type=float, default=2.0, help="reference: the client keeps to its schedule")
    p.add_argument("--max-lag-p99-ms", type=float, default=20.0, help="reference: above this, a client stall")
    p.add_argument("--max-foreign", type=float, default=0.5,
                   help="sweep: a failure while other work used more than this share of CPU 0 or 1 is retried")
    p.add_argument("--contention-retries", type=int, default=2, help="sweep: extra tries for stalls / busy machine")
    p.add_argument("--sweep-refine", type=int, default=2, help="bisection steps after the first failure")
    p.add_argument("--sweep-confirm", type=int, default=1, help="retries before a rate counts as failed")
    p.add_argument("--sweep-timeout", type=float, default=10.0)
    p.add_argument("--added-p99-ms", type=float, default=5.0, help="sweep: p99 TTFT allowed over direct's")
    p.add_argument("--litellm-requests", type=int, default=64, help="cap per LiteLLM round (at least c)")
    p.add_argument("--litellm-max-concurrency", type=int, default=64,
                   help="LiteLLM is saturated well below this; higher c only adds queueing and minutes")
    p.add_argument("--min-round-requests", type=float, default=3,
                   help="c=1: rounds last at least this many request durations")
    p.add_argument("--tokengate-rev", default=None, metavar="REV",
                   help="measure tokengate as of this git revision (git archive into the raw dir), not the "
                        "working tree")
    p.add_argument("--tokengate-count", choices=("remote", "local"), default="remote",
                   help="remote: the fake worker reports no model path, so tokengate counts each prompt with a "
                        "/tokenize call (a worker on another machine); local: tokengate gets a generated tiny model's "
                        "tokenizer with --tokenizer (managed workers, or --tokenizer for external ones)")
    p.add_argument("--tokengate-args", default="", metavar="ARGS",
                   help="more `tokengate serve` flags, one shell-quoted string, e.g. '--non-stream-upstream unary'")
    p.add_argument("--include-usage", action="store_true", help="ask for the usage chunk (stream_options)")
    p.add_argument("--timeout", type=float, default=60.0, help="per request, closed loop")
    p.add_argument("--ready-timeout", type=float, default=90.0)
    p.add_argument("--gateway-cpu", type=int, default=0)
    p.add_argument("--client-cpu", type=int, default=1, help="CPU of the load client and the fake worker")
    p.add_argument("--out", type=Path, default=None, help="default bench/results (quick: bench/results/raw/quick)")
    p.add_argument("--name", default="compare", help="output file stem")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    quick = p.parse_known_args(argv)[0].quick
    if quick:
        p.set_defaults(concurrency="1,64", rounds=2, round_seconds=0.6, warmup_seconds=0.3, lead_in=0.3,
                       sat_seconds=0.6, sweep_seconds=0.6, sweep_min_requests=30, sweep_factor=4.0, sweep_warmup=0.1,
                       min_round_requests=1, sweep_refine=0, sweep_confirm=0,
                       litellm_requests=16, out=RESULTS / "raw" / "quick")
    a = p.parse_args(argv)
    a.out = a.out or RESULTS
    unknown = set(_csv(str, a.arms)) - set(ARMS)
    a.arms = [x for x in ARMS if x in _csv(str, a.arms)]
    if unknown:
        p.error(f"unknown arms {sorted(unknown)}")
    if "direct" not in a.arms:
        a.arms.insert(0, "direct")  # the reference every ratio needs
    a.regimes = [r for r in _csv(str, a.regimes) if r in REGIMES]
    a.modes = [m for m in _csv(str, a.modes) if m in MODES]
    a.concurrency = _csv(int, a.concurrency)
    if a.rounds < 1 or not a.regimes or not a.modes:
        p.error("need rounds >= 1, a regime and a mode")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    t_start = time.monotonic()
    raise_nofile()
    info = machine(a)  # before pinning: it reports the CPUs this process may use
    os.sched_setaffinity(0, {a.client_cpu})
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logdir = a.out / "raw" / f"{a.name}-{stamp}" if a.out == RESULTS else a.out / f"{a.name}-{stamp}"
    logdir.mkdir(parents=True, exist_ok=True)
    a.tokengate_src = None
    if a.tokengate_rev:
        a.tokengate_src = peers.export_tokengate(a.tokengate_rev, logdir / "tokengate-src")
    a.tokengate_extra = shlex.split(a.tokengate_args)
    if a.tokengate_count == "local":
        from app.tinymodel import build_tiny_model

        a.tokengate_extra += ["--tokenizer", f"tiny={build_tiny_model(logdir / 'tiny-model')}"]

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    say(f"compare: arms {','.join(a.arms)}; logs and raw data in {logdir}")
    import uvloop

    with RawWriter(logdir / "requests.csv.gz") as raw:
        results = uvloop.run(run_all(a, logdir, raw, say, t_start))
    info["runtime_s"] = round(time.monotonic() - t_start, 1)
    info["load_avg_end"] = list(os.getloadavg())
    info["timestamp"] = stamp
    info["raw_dir"] = str(logdir.relative_to(Path.cwd()) if logdir.is_relative_to(Path.cwd()) else logdir)
    written = write_outputs(results, info, a, say)
    say(f"[{time.monotonic() - t_start:6.0f}s] done; written: " + ", ".join(str(w) for w in written))


if __name__ == "__main__":
    main()
