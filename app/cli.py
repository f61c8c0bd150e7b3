"""The `tokengate` command.

Every `serve` flag also reads ``TOKENGATE_<FLAG>`` from the environment (flags win): the flags that were given
are passed to ``Settings`` explicitly, and pydantic-settings fills in the rest from the environment.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from . import __version__
from .settings import Settings
from .state import AppState

log = logging.getLogger("tokengate")
TINY_MODEL_NAME = "tiny-llama"


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the gateway", description="Run the gateway. With --upstream it proxies "
                       "to running vLLM servers; with --model it launches them; with neither it serves a tiny "
                       "generated model on a CPU vLLM engine (the embedded default).")
    p.add_argument("--host", help="listen address (default 127.0.0.1) [TOKENGATE_HOST]")
    p.add_argument("--port", type=int, help="listen port (default 8080) [TOKENGATE_PORT]")
    p.add_argument("--upstream", nargs="+", action="extend", metavar="URL",
                   help="running vLLM OpenAI server(s) to proxy to [TOKENGATE_UPSTREAM, comma separated]")
    p.add_argument("--upstream-api-key", help="API key the external workers expect [TOKENGATE_UPSTREAM_API_KEY]")
    p.add_argument("--max-tokens-cap", type=int, metavar="N",
                   help="largest max_tokens a request may ask for (default 4096) [TOKENGATE_MAX_TOKENS_CAP]")
    p.add_argument("--default-max-tokens", type=int, metavar="N",
                   help="max_tokens when a request gives none (default 256) [TOKENGATE_DEFAULT_MAX_TOKENS]")
    p.add_argument("--context-cap", type=int, metavar="N",
                   help="prompt + completion tokens; default and ceiling: the worker's max_model_len "
                        "[TOKENGATE_CONTEXT_CAP]")
    p.add_argument("--cap-policy", choices=["clamp", "reject"],
                   help="max_tokens above the cap: lower it or refuse with 400 (default clamp) "
                        "[TOKENGATE_CAP_POLICY]")
    p.add_argument("--model", help="model directory to serve on managed workers [TOKENGATE_MODEL]")
    p.add_argument("--served-model-name", help="model name clients use [TOKENGATE_SERVED_MODEL_NAME]")
    p.add_argument("--max-model-len", type=int, dest="worker_max_model_len",
                   help="managed workers' --max-model-len (default 2048) [TOKENGATE_WORKER_MAX_MODEL_LEN]")
    p.add_argument("--region", help="region of requests without x-tokengate-region (default local) "
                   "[TOKENGATE_REGION]")
    p.add_argument("--state-dir", type=Path, help="where models and worker logs go [TOKENGATE_STATE_DIR]")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"],
                   help="[TOKENGATE_LOG_LEVEL]")
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokengate", description="OpenAI-compatible serving gateway over vLLM.")
    parser.add_argument("--version", action="version", version=f"tokengate {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _serve_parser(sub)
    try:
        from .cli_presets import add_presets_parser
    except ImportError:  # pragma: no cover - during development of presets
        pass
    else:
        add_presets_parser(sub)
    return parser


_SETTINGS_FLAGS = ("host", "port", "upstream", "upstream_api_key", "max_tokens_cap", "default_max_tokens",
                   "context_cap", "cap_policy", "model", "served_model_name", "worker_max_model_len", "region",
                   "state_dir", "log_level")


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {k: getattr(args, k) for k in _SETTINGS_FLAGS if getattr(args, k, None) is not None}
    return Settings(**given)


def _examples(state: AppState) -> str:
    s = state.settings
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
    base = f"http://{host}:{s.port}"
    model = sorted(state.registry.snapshot.models)[0] if state.registry.snapshot.models else "MODEL"
    body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}
                        ).decode()
    sdk = (
        "from openai import OpenAI\n"
        f"client = OpenAI(base_url=\"{base}/v1\", api_key=\"unused\")\n"
        f"for chunk in client.chat.completions.create(model=\"{model}\", stream=True, max_tokens=32,\n"
        "        messages=[{\"role\": \"user\", \"content\": \"Hello!\"}]):\n"
        "    print(chunk.choices[0].delta.content or \"\", end=\"\", flush=True)\n"
    )
    return (
        f"\ntokengate {__version__} is ready on {base} — serving {model}\n\n"
        f"  curl -N {base}/v1/chat/completions -H 'content-type: application/json' \\\n"
        f"    -d {shlex.quote(body)}\n\n"
        f"  python - <<'EOF'\n{sdk}EOF\n\n"
        f"  metrics: {base}/metrics   readiness: {base}/readyz   Ctrl-C stops everything.\n"
    )


def _worker_specs(settings: Settings) -> tuple[Settings, list[Any]]:
    """Managed-worker specs for --model, or for the embedded default (a tiny model on the CPU engine)."""
    from .workers.launch import EngineArgs, cpu_worker_spec

    if settings.upstream:
        return settings, []
    if settings.model is None:
        from .tinymodel import build_tiny_model

        path = build_tiny_model(settings.state_dir / "models" / TINY_MODEL_NAME)
        settings = settings.model_copy(update={"model": str(path),
                                               "served_model_name": settings.served_model_name or TINY_MODEL_NAME})
    assert settings.model is not None
    name = settings.served_model_name or Path(settings.model).name
    args = EngineArgs(model=settings.model, served_model_name=name, max_model_len=settings.worker_max_model_len,
                      extra_args=tuple(settings.worker_extra_args))
    spec = cpu_worker_spec(args, name=f"{settings.region}-cpu-0", region=settings.region, preset="cpu",
                           log_dir=settings.state_dir / "logs")
    return settings, [spec]


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"tokengate serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings, specs = _worker_specs(settings)
    return run_server(settings, specs)


def run_server(settings: Settings, specs: Sequence[Any]) -> int:
    import uvicorn

    from .main import create_app

    def on_ready(state: AppState) -> None:
        print(_examples(state), flush=True)

    app = create_app(settings, worker_specs=specs, on_ready=on_ready)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, loop="uvloop", http="httptools",
                            lifespan="on", log_level=settings.log_level, access_log=settings.access_log,
                            timeout_graceful_shutdown=30, server_header=False)
    server = uvicorn.Server(config)
    try:
        server.run()
    except KeyboardInterrupt:  # pragma: no cover - uvicorn handles SIGINT itself
        pass
    return 0 if server.started else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
