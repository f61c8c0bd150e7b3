"""What managed workers leave behind: their process groups, and their shared memory in /dev/shm.

Run as a script (``python -I janitor.py``, by the supervisor), it is the janitor process: it reads "+PGID" and
"-PGID" lines on stdin, and at the end of its input — the gateway exited or was killed — it kills every group still
known and removes the /dev/shm segments their processes had mapped. vLLM's engine keeps its queues there (hundreds
of MiB); a process killed with SIGKILL, and multiprocessing's resource tracker killed with it, unlink nothing, and
/dev/shm is memory (64 MiB in all in a default Docker container). The supervisor uses the same functions after a
worker's group has ended (a crash, a kill -9 of its engine). Imports nothing of the app: the janitor runs on its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterable

SHM = "/dev/shm/"


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group, from /proc."""
    found: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
        except OSError:
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            found.append(int(entry))
    return found


def shm_of(pgid: int) -> set[str]:
    """The /dev/shm files the processes of a group have mapped (segments, named semaphores)."""
    paths: set[str] = set()
    for pid in group_members(pgid):
        try:
            with open(f"/proc/{pid}/maps", "rb") as f:
                for line in f:
                    at = line.find(SHM.encode())
                    if at >= 0:
                        paths.add(line[at:].rstrip(b"\n").removesuffix(b" (deleted)").decode(errors="replace"))
        except OSError:
            continue
    return paths


def remove(paths: Iterable[str]) -> int:
    """Unlink these /dev/shm files (those still there); the bytes they held."""
    freed = 0
    for path in paths:
        if not path.startswith(SHM) or "/" in path[len(SHM):]:
            continue  # (only what a /proc maps line named directly under /dev/shm)
        with contextlib.suppress(OSError):
            size = os.stat(path).st_size
            os.unlink(path)
            freed += size
    return freed


def _main() -> None:
    groups: set[int] = set()
    for line in sys.stdin:
        (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))
    shm: set[str] = set().union(*map(shm_of, groups))
    for pgid in groups:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(group_members(g) for g in groups) and time.monotonic() < deadline:
        time.sleep(0.05)
    remove(shm)


if __name__ == "__main__":
    _main()
