"""Worker log files: a bounded tail, read from the end (logs of long-running engines get large)."""

from __future__ import annotations

import os
from pathlib import Path

MAX_TAIL_BYTES = 1024 * 1024


def tail(path: Path, lines: int, max_bytes: int = MAX_TAIL_BYTES) -> str:
    lines = max(1, min(lines, 10_000))
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            block = 64 * 1024
            data = b""
            pos = size
            while pos > 0 and data.count(b"\n") <= lines and len(data) < max_bytes:
                step = min(block, pos)
                pos -= step
                f.seek(pos)
                data = f.read(step) + data
    except FileNotFoundError:
        return ""
    text = data[-max_bytes:].decode("utf-8", "replace")
    out = text.splitlines(keepends=True)[-lines:]
    return "".join(out)
