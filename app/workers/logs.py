"""Worker log files: a bounded tail, read from the end (logs of long-running engines get large), and a bounded size
on disk (``rotate``: the supervisor's housekeeping)."""

from __future__ import annotations

import os
from pathlib import Path

MAX_TAIL_BYTES = 1024 * 1024
MAX_LOG_BYTES = 64 * 1024 * 1024  # a worker's log file past this is moved to NAME.1 (the one before it dropped)


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


def rotate(path: Path, limit: int = MAX_LOG_BYTES) -> bool:
    """Past ``limit`` bytes, copy the log to ``NAME.1`` and empty it (copy-truncate: the worker keeps writing to
    the file it opened, in append mode, so it goes on at the new end). A line written between the copy and the
    truncation is lost; a log that fills a disk loses more."""
    try:
        if path.stat().st_size <= limit:
            return False
        old = path.with_name(path.name + ".1")
        with open(path, "rb") as src, open(old, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.truncate(path, 0)
    except OSError:
        return False
    return True
