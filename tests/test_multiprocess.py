"""``tokengate serve --workers N``: several gateway processes on one port, metrics summed across them."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict

from bench.fakeworker import ThreadedFakeWorker

from .utils import gateway_process, metric_sum, scrape, wait_until

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "stream": False}


@pytest.fixture
def worker() -> Iterator[ThreadedFakeWorker]:
    with ThreadedFakeWorker() as w:
        yield w


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _served_by_process(metrics_dir: Path) -> dict[int, float]:
    """Requests each gateway process answered, read from its own prometheus-client file."""
    served: dict[int, float] = {}
    for db in metrics_dir.glob("counter_*.db"):
        pid = int(re.findall(r"\d+", db.name)[0])
        d = MmapedDict(str(db), read_mode=True)
        served[pid] = sum(v for k, v, _ in d.read_all_values() if '"tokengate_requests_total"' in k)
        d.close()
    return served


def test_two_processes_share_the_port_and_one_scrape_sums_them(worker: ThreadedFakeWorker) -> None:
    with gateway_process("--upstream", worker.url, "--workers", "2", ready_timeout=60) as gw:
        def send(n: int) -> None:
            for _ in range(n):  # a new connection each: the kernel hands them to either process
                r = httpx.post(gw.base + "/chat/completions", json=CHAT, headers={"connection": "close"}, timeout=10)
                assert r.status_code == 200
        threads = [threading.Thread(target=send, args=(15,)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # every scrape, whichever process answers it, counts all 120
        for _ in range(6):
            samples = scrape(gw.url + "/metrics", headers={"connection": "close"})
            assert metric_sum(samples, "tokengate_requests_total", status="200") == 120
            # and the status page shows the same sums, not the answering process's share
            doc = httpx.get(gw.url + "/status.json", headers={"connection": "close"}).json()
            assert doc["totals"]["requests"] == 120 and [w["up"] for w in doc["workers"]] == [1.0], doc["totals"]
        kids = [p for p in _children(gw.proc.pid) if "serve" not in Path(f"/proc/{p}/cmdline").read_text()]
        environ = Path(f"/proc/{kids[0]}/environ").read_bytes().split(b"\0") if kids else []
        dirs = [e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"PROMETHEUS_MULTIPROC_DIR=")]
        assert dirs, "the gateway processes run with prometheus-client's multiprocess directory"
        served = _served_by_process(Path(dirs[0]))
        assert sum(served.values()) == 120
        assert len([n for n in served.values() if n > 0]) == 2, served  # both processes served requests
        assert len(_children(gw.proc.pid)) >= 2
    assert not os.path.exists(dirs[0])  # the per-process files are removed at exit


def test_workers_refuse_managed_workers(tmp_path: Path) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--workers", "2", "--preset", "cpu",
                        "--state-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--workers needs --upstream" in r.stderr


@pytest.mark.parametrize("how", ["parent", "group-term", "group-int"])
def test_sigterm_drains_every_process_as_one_process_does(worker: ThreadedFakeWorker, how: str) -> None:
    """The supervisor forwards SIGTERM to each gateway process; each one drains: /readyz and new requests 503 while
    the streams in flight finish, then every process exits. Also when the signal reaches the whole group (a
    terminal's Ctrl-C, systemd): the forwarded SIGTERM that follows is not a second signal."""
    worker.options.token_delay = 0.05  # 40 tokens: ~2 s
    try:
        with gateway_process("--upstream", worker.url, "--workers", "2", "--drain-timeout", "10",
                             ready_timeout=60) as gw:
            kids = _children(gw.proc.pid)
            results: list[str] = []

            def stream() -> None:
                body = {**CHAT, "stream": True, "max_tokens": 40}
                with httpx.stream("POST", gw.base + "/chat/completions", json=body, timeout=30,
                                  headers={"connection": "close"}) as r:
                    results.append(r.read().decode())

            threads = [threading.Thread(target=stream) for _ in range(4)]  # new connections: both processes
            for t in threads:
                t.start()
            wait_until(lambda: worker.stats.in_flight == 4, 5, "4 streams in flight")
            if how == "parent":
                gw.proc.send_signal(signal.SIGTERM)
            else:
                os.killpg(gw.proc.pid, signal.SIGTERM if how == "group-term" else signal.SIGINT)
            time.sleep(1.0)  # (past the supervisor's forwarding: it looks at signals every 0.5 s)
            for _ in range(4):  # whichever process takes the connection
                r = httpx.post(gw.base + "/chat/completions", json=CHAT, headers={"connection": "close"}, timeout=5)
                assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"], r.text
                ready = httpx.get(gw.url + "/readyz", headers={"connection": "close"}, timeout=5)
                assert ready.status_code == 503 and ready.json()["draining"] is True
            for t in threads:
                t.join(20)
            assert len(results) == 4 and all(r.rstrip().endswith("data: [DONE]") for r in results), results
            assert gw.proc.wait(20) in (0, 130), gw.log.read_text()[-2000:]
            wait_until(lambda: not any(Path(f"/proc/{k}").exists() for k in kids), 10, "every gateway process gone")
    finally:
        worker.options.token_delay = 0.0
