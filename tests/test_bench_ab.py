"""bench/ab.py: the tree it exports for arm A and the figures it reports (the run itself is a benchmark)."""

from __future__ import annotations

import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bench.ab import Arm, export_tree, gateway_cmd, scrapes, start_scraper, summary
from bench.loadclient import RequestRecord
from bench.overhead import stop


def _rec(ttft_ms: float, e2e_ms: float) -> RequestRecord:
    return RequestRecord(0.0, ttft_ms / 1000, e2e_ms / 1000, 3, 200, True)


def test_summary_reports_each_gateway_against_the_direct_arm() -> None:
    arms = {
        "direct": Arm(records=[_rec(20 + i / 10, 100 + i / 10) for i in range(100)], elapsed=1.0),
        "A": Arm(records=[_rec(22 + i / 10, 103 + i / 10) for i in range(100)], elapsed=2.0, cpu=0.02),
        "B": Arm(records=[_rec(20.5 + i / 10, 100.5 + i / 10) for i in range(100)], elapsed=2.0, cpu=0.01),
    }
    s = summary(arms)
    assert abs(s["A"]["ttft_added_p50_ms"] - 2.0) < 1e-6 and abs(s["A"]["e2e_added_p99_ms"] - 3.0) < 1e-6
    assert s["A"]["rps"] == 50.0 and s["A"]["cpu_us_per_request"] == 200.0
    assert s["B"]["rps"] == 50.0 and s["B"]["cpu_us_per_request"] == 100.0
    assert abs(s["B"]["ttft_added_p90_ms"] - 0.5) < 1e-6 and abs(s["B"]["e2e_added_p50_ms"] - 0.5) < 1e-6


def test_arm_a_runs_the_gateway_of_the_revision_asked_for(tmp_path: Path) -> None:
    tree = export_tree("HEAD", tmp_path)
    assert (tree / "app" / "cli.py").is_file() and (tree / "presets").is_dir()
    head = subprocess.run(["git", "show", "HEAD:app/cli.py"], check=True, capture_output=True).stdout
    assert (tree / "app" / "cli.py").read_bytes() == head
    cmd = gateway_cmd(tree, 1, ["http://127.0.0.1:2", "http://127.0.0.1:3"])
    assert [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--upstream"] == ["http://127.0.0.1:2",
                                                                               "http://127.0.0.1:3"]
    out = subprocess.run([*cmd[:3], "--version"], capture_output=True, text=True, cwd="/", timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("tokengate")


def test_the_scraper_goes_on_after_a_failed_scrape_and_counts_both(tmp_path: Path) -> None:
    seen: list[str] = []

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            seen.append(self.path)
            body = b"up 1\n"
            self.send_response(500 if len(seen) <= 2 else 200)  # the first two fail
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    current, log = tmp_path / "current", tmp_path / "scraper.log"
    scraper = start_scraper(current, 0.05, 0, log)
    try:
        current.write_text(f"http://127.0.0.1:{server.server_address[1]}")
        deadline = time.monotonic() + 30
        while scrapes(log)["ok"] < 2 and time.monotonic() < deadline and scraper.poll() is None:
            time.sleep(0.05)
    finally:
        stop(scraper)
        server.shutdown()
        server.server_close()
    counted = scrapes(log)
    assert counted["failed"] == 2 and counted["ok"] >= 2, log.read_text()
    assert set(seen) == {"/metrics"}
