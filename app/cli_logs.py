"""``tokengate logs [WORKER] [--lines N] [--state-dir DIR]``: the tail of managed workers' logs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .settings import Settings, describe_errors


def add_logs_parser(sub: Any) -> None:
    p = sub.add_parser("logs", help="show the tail of managed workers' logs")
    p.add_argument("worker", nargs="?", help="worker name (default: every worker)")
    p.add_argument("--lines", type=int, default=50)
    p.add_argument("--state-dir", type=Path, help="[TOKENGATE_STATE_DIR]")
    p.set_defaults(func=cmd_logs)


def cmd_logs(args: argparse.Namespace) -> int:
    if args.state_dir is None:
        try:
            args.state_dir = Settings().state_dir
        except ValidationError as exc:
            print(f"tokengate logs: invalid settings:\n{describe_errors(exc)}", file=sys.stderr)
            return 2
    log_dir = args.state_dir / "logs"
    files = sorted(log_dir.glob(f"{args.worker}.log" if args.worker else "*.log"))
    if not files:
        print(f"no worker logs in {log_dir}", file=sys.stderr)
        return 1
    from .workers.logs import tail

    for f in files:
        print(f"==> {f.name} <==")
        sys.stdout.write(tail(f, args.lines))
    return 0
