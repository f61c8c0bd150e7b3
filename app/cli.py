"""The `tokengate` command.

Every `serve` flag also reads ``TOKENGATE_<FLAG>`` from the environment (flags win): the flags that were given
are passed to ``Settings`` explicitly, and pydantic-settings fills in the rest from the environment.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import orjson
import uvicorn
from pydantic import ValidationError

from . import __version__
from .caps import CapConfig
from .settings import UNLABELLED_REGION, Settings, describe_errors
from .state import AppState
from .workers.supervisor import WorkerSpec

log = logging.getLogger("tokengate")

# flag dest → Settings field (all of them also read TOKENGATE_<FIELD> from the environment)
_SETTINGS_FLAGS = ("host", "port", "upstream", "upstream_api_key", "tokenizers", "max_tokens_cap", "default_max_tokens",
                   "context_cap", "cap_policy", "model", "served_model_name", "worker_max_model_len", "region",
                   "region_fallbacks", "preset", "presets", "gpus", "replicas", "worker_env", "worker_extra_args",
                   "state_dir",
                   "drain_timeout", "prefix_affinity_bytes", "admin_key", "log_level", "keys_file",
                   "redis_url", "redis_fail_open", "worker_concurrency", "queue_size", "queue_timeout", "max_n",
                   "max_logprobs",
                   "allow_fields", "allow_unknown_fields", "allow_remote_media", "forwarded_allow_ips",
                   "cors_origins",
                   "header_timeout", "body_timeout", "write_timeout", "connect_timeout", "read_timeout",
                   "stream_idle_timeout", "workers", "non_stream_upstream",
                   "busy_poll", "write_batch", "dry_run")


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve", help="run the gateway",
        description="Run the gateway. With --upstream it proxies to running vLLM servers; with --model and "
                    "--region/--preset it launches and supervises them; with neither it serves a tiny generated "
                    "model on a CPU vLLM engine (the embedded default). Every flag also reads TOKENGATE_<FLAG>.")
    p.add_argument("--host", help="listen address (default 127.0.0.1) [TOKENGATE_HOST]")
    p.add_argument("--port", type=int, help="listen port (default 8080) [TOKENGATE_PORT]")
    p.add_argument("--upstream", nargs="+", action="extend", metavar="URL",
                   help="running vLLM OpenAI server(s) to proxy to, as URL or REGION[/PRESET]=URL "
                        "[TOKENGATE_UPSTREAM, comma separated]")
    p.add_argument("--upstream-api-key", help="API key the external workers expect [TOKENGATE_UPSTREAM_API_KEY]")
    p.add_argument("--tokenizer", action="append", dest="tokenizers", metavar="MODEL=PATH",
                   help="the served model MODEL's tokenizer files on this machine (a directory with tokenizer.json, "
                        "tokenizer_config.json, the chat template: the same files the workers load), for workers on "
                        "other machines: prompts are counted here instead of by a /tokenize call to a worker per "
                        "request (repeatable) [TOKENGATE_TOKENIZERS, comma separated]")
    p.add_argument("--max-tokens-cap", type=int, metavar="N",
                   help="largest max_tokens a request may ask for (default: the preset's, else 4096) "
                        "[TOKENGATE_MAX_TOKENS_CAP]")
    p.add_argument("--default-max-tokens", type=int, metavar="N",
                   help="max_tokens when a request gives none (default: the preset's, else 256) "
                        "[TOKENGATE_DEFAULT_MAX_TOKENS]")
    p.add_argument("--context-cap", type=int, metavar="N",
                   help="prompt + completion tokens; default and ceiling: the worker's max_model_len "
                        "[TOKENGATE_CONTEXT_CAP]")
    p.add_argument("--non-stream-upstream", choices=["stream", "unary"],
                   help="how a \"stream\": false request is asked of the worker: stream (default: the answer is "
                        "gathered from the worker's stream, with decode-speed metrics, the idle timeout and an abort "
                        "the worker can't miss) or unary (its JSON answer passed through: several times less gateway "
                        "CPU per request) [TOKENGATE_NON_STREAM_UPSTREAM]")
    p.add_argument("--cap-policy", choices=["clamp", "reject"],
                   help="max_tokens above the cap: lower it or refuse with 400 (default clamp) "
                        "[TOKENGATE_CAP_POLICY]")
    p.add_argument("--model", help="model directory to serve on managed workers [TOKENGATE_MODEL]")
    p.add_argument("--served-model-name", help="model name clients use [TOKENGATE_SERVED_MODEL_NAME]")
    p.add_argument("--region", help="region of the managed workers and of requests without x-tokengate-region "
                                    "(default local) [TOKENGATE_REGION]")
    p.add_argument("--preset", help="GPU preset in --region (see `tokengate presets list`), or 'cpu' "
                                    "[TOKENGATE_PRESET]")
    p.add_argument("--presets", action="append", type=Path, metavar="DIR",
                   help="extra presets directory (repeatable) [TOKENGATE_PRESETS]")
    p.add_argument("--gpus", help="GPU indices to use, e.g. 0,1,2,3 (default: all visible) [TOKENGATE_GPUS]")
    p.add_argument("--replicas", type=int, help="CPU workers with --preset cpu (default 1) [TOKENGATE_REPLICAS]")
    p.add_argument("--max-model-len", type=int, dest="worker_max_model_len",
                   help="managed workers' --max-model-len (default: the preset's; 2048 on CPU) "
                        "[TOKENGATE_WORKER_MAX_MODEL_LEN]")
    p.add_argument("--worker-env", action="append", metavar="KEY=VALUE",
                   help="extra environment for managed workers (repeatable) [TOKENGATE_WORKER_ENV]")
    p.add_argument("--worker-arg", action="append", dest="worker_extra_args", metavar="ARG",
                   help="extra vLLM argument for managed workers, e.g. --worker-arg=--enforce-eager (repeatable) "
                        "[TOKENGATE_WORKER_EXTRA_ARGS, comma separated]")
    p.add_argument("--fallback-region", action="append", dest="region_fallbacks", metavar="FROM=TO",
                   help="let requests for region FROM use region TO when FROM has no ready worker "
                        "(repeatable; traffic never leaves its region otherwise) [TOKENGATE_REGION_FALLBACKS]")
    p.add_argument("--prefix-affinity", type=int, dest="prefix_affinity_bytes", metavar="BYTES",
                   help="route prompts sharing their first BYTES bytes to the same worker, within a load bound "
                        "(default 0: off) [TOKENGATE_PREFIX_AFFINITY_BYTES]")
    p.add_argument("--drain-timeout", type=float, metavar="S",
                   help="on SIGTERM/Ctrl-C, seconds in-flight requests may finish (default 30) "
                        "[TOKENGATE_DRAIN_TIMEOUT]")
    p.add_argument("--keys", dest="keys_file", type=Path, metavar="FILE",
                   help="API keys file (hashes, per-key limits; `tokengate keys create`). Without it the gateway "
                        "runs in OPEN mode: anyone who reaches the port can use it [TOKENGATE_KEYS_FILE]")
    p.add_argument("--redis", dest="redis_url", metavar="URL",
                   help="share rate limits across gateway replicas (redis://host:6379/0) [TOKENGATE_REDIS_URL]")
    p.add_argument("--redis-fail-open", action="store_true", default=None,
                   help="while that Redis cannot be reached (at start too), admit requests without their keys' "
                        "limits, logged, instead of answering 503 [TOKENGATE_REDIS_FAIL_OPEN]")
    p.add_argument("--worker-concurrency", type=int, metavar="N",
                   help="requests in flight per worker before the gateway queues (default 256) "
                        "[TOKENGATE_WORKER_CONCURRENCY]")
    p.add_argument("--queue-size", type=int, metavar="N",
                   help="requests waiting per worker pool before 429 (default 1024) [TOKENGATE_QUEUE_SIZE]")
    p.add_argument("--queue-timeout", type=float, metavar="S",
                   help="longest wait in the queue before 503 (default 30) [TOKENGATE_QUEUE_TIMEOUT]")
    p.add_argument("--max-n", type=int, help="largest n (default 8) [TOKENGATE_MAX_N]")
    p.add_argument("--max-logprobs", type=int, help="largest logprobs/top_logprobs (default 20) "
                                                    "[TOKENGATE_MAX_LOGPROBS]")
    p.add_argument("--allow-field", action="append", dest="allow_fields", metavar="NAME",
                   help="let a refused vLLM-only field through, e.g. chat_template_kwargs [TOKENGATE_ALLOW_FIELDS]")
    p.add_argument("--allow-unknown-fields", action="store_true", default=None,
                   help="forward unknown request fields instead of 400 [TOKENGATE_ALLOW_UNKNOWN_FIELDS]")
    p.add_argument("--allow-remote-media", action="store_true", default=None,
                   help="let workers fetch http(s) media URLs [TOKENGATE_ALLOW_REMOTE_MEDIA]")
    p.add_argument("--forwarded-allow-ips", action="append", metavar="IP",
                   help="a reverse proxy whose X-Forwarded-For/-Proto are trusted (repeatable; default: none, "
                        "so clients cannot spoof their address) [TOKENGATE_FORWARDED_ALLOW_IPS]")
    p.add_argument("--cors-origin", action="append", dest="cors_origins", metavar="ORIGIN",
                   help="a web page origin (https://app.example.com) allowed to call from a browser; '*' for any "
                        "(repeatable; default: none) [TOKENGATE_CORS_ORIGINS]")
    p.add_argument("--header-timeout", type=float, metavar="S",
                   help="time a client has to send its request headers (default 10) [TOKENGATE_HEADER_TIMEOUT]")
    p.add_argument("--body-timeout", type=float, metavar="S",
                   help="time a client has to send its request body (default 30) [TOKENGATE_BODY_TIMEOUT]")
    p.add_argument("--connect-timeout", type=float, metavar="S",
                   help="time to connect to a worker before another is tried (default 5) [TOKENGATE_CONNECT_TIMEOUT]")
    p.add_argument("--read-timeout", type=float, metavar="S",
                   help="time a worker has to answer a request sent to it, and again to send its first token "
                        "(queueing and prefill), then 504 (default 600) [TOKENGATE_READ_TIMEOUT]")
    p.add_argument("--stream-idle-timeout", type=float, metavar="S",
                   help="longest silence allowed between a worker's tokens before the stream ends with an error "
                        "event (an unstreamed answer: 504) (default 120) [TOKENGATE_STREAM_IDLE_TIMEOUT]")
    p.add_argument("--workers", type=int, metavar="N",
                   help="gateway processes sharing the port, metrics summed across them (external workers "
                        "only; give them --redis for shared limits) [TOKENGATE_WORKERS]")
    p.add_argument("--busy-poll", type=float, metavar="S",
                   help="at light load (1-4 requests in flight) keep the event loop polling instead of "
                        "sleeping, and S seconds after the last request: saves each request the wake-ups of an idle "
                        "process (0.1-0.2 ms at one stream on a GPU host) for a CPU core per gateway process kept "
                        "busy meanwhile (default 0: off) [TOKENGATE_BUSY_POLL]")
    p.add_argument("--write-batch", type=int, metavar="N",
                   help="hold the socket writes of one event-loop pass and issue them together, at most N: fewer "
                        "wake-ups of the workers and clients, ~12 %% less gateway CPU per request when busy, for a "
                        "write up to one pass later (default 16; 1: each write at once) [TOKENGATE_WRITE_BATCH]")
    p.add_argument("--write-timeout", type=float, metavar="S",
                   help="drop a stream whose client has not read for this long, aborting its worker request "
                        "(default 30) [TOKENGATE_WRITE_TIMEOUT]")
    p.add_argument("--admin-key", help="bearer key for /admin/* (default: loopback clients only) "
                                       "[TOKENGATE_ADMIN_KEY]")
    p.add_argument("--state-dir", type=Path, help="where models and worker logs go (default ~/.cache/tokengate) "
                                                  "[TOKENGATE_STATE_DIR]")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"],
                   help="[TOKENGATE_LOG_LEVEL]")
    p.add_argument("--dry-run", action="store_true", default=None,
                   help="print the exact worker command lines and environment, start nothing [TOKENGATE_DRY_RUN]")
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokengate", description="OpenAI-compatible serving gateway over vLLM.")
    parser.add_argument("--version", action="version", version=f"tokengate {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _serve_parser(sub)
    from .cli_advise import add_advise_parser
    from .cli_bench import add_bench_parser
    from .cli_keys import add_keys_parser
    from .cli_logs import add_logs_parser
    from .cli_presets import add_presets_parser

    add_logs_parser(sub)
    add_presets_parser(sub)
    add_bench_parser(sub)
    add_advise_parser(sub)
    add_keys_parser(sub)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {k: getattr(args, k) for k in _SETTINGS_FLAGS if getattr(args, k, None) is not None}
    return Settings(**given)


def _examples(state: AppState) -> str:
    s = state.settings
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(s.host, s.host)  # where a local client reaches it
    base = f"http://{f'[{host}]' if ':' in host else host}:{s.port}"  # an IPv6 address in brackets
    model = sorted(state.registry.snapshot.models)[0] if state.registry.snapshot.models else "MODEL"
    body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}
                        ).decode()
    keyed = not state.proxy.keys.is_open  # then the examples take the key from $TOKENGATE_KEY
    api_key = 'os.environ["TOKENGATE_KEY"]' if keyed else '"unused"'
    sdk = (
        ("import os\n" if keyed else "") + "from openai import OpenAI\n"
        f"client = OpenAI(base_url=\"{base}/v1\", api_key={api_key})\n"
        f"for chunk in client.chat.completions.create(model=\"{model}\", stream=True, max_tokens=32,\n"
        "        messages=[{\"role\": \"user\", \"content\": \"Hello!\"}]):\n"
        "    print(chunk.choices[0].delta.content or \"\", end=\"\", flush=True)\n"
    )
    return (
        f"\ntokengate {__version__} is ready on {base} — serving {model}\n\n"
        + ("  export TOKENGATE_KEY=...   # a key of the keys file (tokengate keys create)\n\n" if keyed else "")
        + f"  curl -N {base}/v1/chat/completions -H 'content-type: application/json' \\\n"
        + ("    -H \"authorization: Bearer $TOKENGATE_KEY\" \\\n" if keyed else "")
        + f"    -d {shlex.quote(body)}\n\n"
        + f"  {shlex.quote(sys.executable)} - <<'EOF'\n{sdk}EOF\n\n"
        f"  metrics: {base}/metrics   readiness: {base}/readyz   Ctrl-C stops everything.\n"
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from .deployment import plan_deployment, preset_caps
    from .presets import PresetError, builtin_presets_dir, load_catalog
    from .workers.plan import PlanError, describe

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"tokengate serve: invalid settings:\n{describe_errors(exc)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        catalog = load_catalog([builtin_presets_dir(), *settings.presets])
        deployment = plan_deployment(settings, catalog, dry_run=settings.dry_run)
    except (PresetError, PlanError, LookupError) as exc:
        print(f"tokengate serve: {exc}", file=sys.stderr)
        return 2
    if settings.dry_run:
        for note in deployment.notes:
            print(note if note.startswith("#") else f"# {note}")
        print(describe(deployment.specs) if deployment.specs else "# no managed workers")
        return 0
    for note in deployment.notes:
        log.info("%s", note)
    served = {u.region or UNLABELLED_REGION for u in deployment.settings.upstreams()}
    if deployment.settings.region is None and not deployment.specs and deployment.settings.default_region not in served:
        log.warning("upstreams in regions %s and no --region: a request without x-tokengate-region goes to region "
                    "'%s', which has no worker (503); choose the default with --region", ", ".join(sorted(served)),
                    deployment.settings.default_region)
    return run_server(deployment.settings, deployment.specs, preset_caps(catalog), set(catalog.regions))


def run_server(settings: Settings, specs: Sequence[WorkerSpec], caps: Mapping[str, CapConfig] | None = None,
               regions: set[str] | None = None) -> int:
    from .httpserver import server_config
    from .limits_redis import url_problem
    from .main import create_app

    if settings.redis_fail_open and not settings.redis_url:
        print("tokengate serve: --redis-fail-open needs --redis (limits are in memory without it)", file=sys.stderr)
        return 2
    # (--redis-fail-open: a Redis that does not answer is no reason not to start; a URL that can't work still is)
    if settings.redis_url and (problem := url_problem(settings.redis_url, ping=not settings.redis_fail_open)):
        print(f"tokengate serve: --redis: {problem}", file=sys.stderr)  # before anything starts
        return 2
    if settings.workers > 1:
        if specs:
            print("tokengate serve: --workers needs --upstream: managed workers are supervised by one gateway "
                  "process (run one gateway with managed workers, or several in front of external ones)",
                  file=sys.stderr)
            return 2
        return _run_processes(settings)

    def on_ready(state: AppState) -> None:
        print(_examples(state), flush=True)

    try:
        app = create_app(settings, worker_specs=specs, preset_caps=caps, regions=regions or set(),
                         on_ready=on_ready)
    except ValueError as exc:  # a keys file or --redis URL that can't be used (KeysError is a ValueError)
        print(f"tokengate serve: {exc}", file=sys.stderr)
        return 2
    state: AppState = app.state.tokengate
    server = DrainingServer(server_config(app, settings), state)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C it handled again once all is stopped: no traceback
        return 130
    if server.stopped_by == signal.SIGINT:  # raised again into a process that ignores SIGINT (a background
        return 130  # job of a non-interactive shell inherits that): it was a Ctrl-C all the same
    return 0 if server.started else 1


def _run_processes(settings: Settings) -> int:
    """``--workers N``: N gateway processes accepting on one socket (uvicorn's multiprocess supervisor), each
    built by ``app.main:app_from_env`` from these settings; metrics summed across them through
    prometheus-client's multiprocess mode (a fresh directory of per-process files, removed at the end)."""
    import os
    import shutil
    import tempfile

    from uvicorn.supervisors import Multiprocess

    from .httpserver import PROTOCOL_PATH, server_config
    from .main import SETTINGS_ENV

    metrics_dir = tempfile.mkdtemp(prefix="tokengate-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    os.environ[SETTINGS_ENV] = settings.model_dump_json()
    try:
        config = server_config("app.main:app_from_env", settings, factory=True, workers=settings.workers,
                               http=PROTOCOL_PATH)
        sock = config.bind_socket()
        log.info("tokengate: %d gateway processes on http://%s:%d", settings.workers, settings.host, settings.port)
        Multiprocess(config, sockets=[sock]).run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


class DrainingServer(uvicorn.Server):
    """uvicorn's Server that drains before it shuts down. The first SIGTERM/SIGINT marks the gateway draining
    (/readyz → 503, new requests → 503) and it keeps listening — uvicorn alone would close the socket at once, so a
    load balancer or client would meet "connection refused", not a 503 — while in-flight requests finish, up to
    ``drain_timeout``. Then uvicorn shuts down: what still runs is cancelled (a stream ends with an in-band error
    event) and the lifespan stops the workers. A second signal ends the wait."""

    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config)
        self._state = state
        self._drain: tuple[int, float] | None = None  # (signal, deadline)
        self.stopped_by: int | None = None  # the first signal that stopped it

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.stopped_by is None:
            self.stopped_by = sig
        if self._drain is None and not self.should_exit:
            self._state.proxy.draining = True
            timeout = self._state.settings.drain_timeout
            self._drain = (sig, time.monotonic() + timeout)
            if self.server_state.tasks:  # say why it does not stop at once
                log.warning("draining: %d request(s) in flight may finish (up to %g s); signal again to stop now",
                            len(self.server_state.tasks), timeout)
            return
        self.config.timeout_graceful_shutdown = 0
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._drain is not None and not self.should_exit:
            sig, deadline = self._drain
            left = deadline - time.monotonic()
            if left <= 0 or not self.server_state.tasks:  # every request has finished, or time is up
                self.config.timeout_graceful_shutdown = max(0, math.ceil(left))
                super().handle_exit(sig, None)
        return await super().on_tick(counter)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code: int = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:  # `tokengate presets list | head`: the reader has gone, which is no error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python's flush at exit would raise again)
        return 128 + signal.SIGPIPE
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
