"""A private Prometheus for tests: Debian's ``prometheus`` on a free loopback port.

It gets its own data directory, scrapes the given targets and evaluates the given rule files
every second, and is asked over its HTTP API (never slept on). Tests skip with the reason
only where prometheus is not installed (CI installs it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.daemons import free_port, stop_process

__all__ = ["Prometheus", "start_prometheus"]

CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files: {rules}
scrape_configs:
  - job_name: smtpproxy
    static_configs:
      - targets: {targets}
"""


@dataclass
class Prometheus:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def api(self, path: str, **params: str) -> Any:
        """The ``data`` of one API answer (blocking: call it in a thread from async tests)."""
        query = "?" + urllib.parse.urlencode(params) if params else ""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/{path}{query}", timeout=10) as r:
            answer = json.load(r)
        assert answer["status"] == "success", answer
        return answer["data"]

    def alerts(self) -> dict[str, str]:
        """{alert name: state (pending, firing)} of the active alerts."""
        return {a["labels"]["alertname"]: a["state"] for a in self.api("alerts")["alerts"]}

    def wait(self, what: str, check: Any, timeout: float = 60) -> Any:
        """Poll ``check()`` until it returns something truthy."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            last = check()
            if last:
                return last
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"prometheus: {what} never happened (last: {last!r}); log:\n"
                                     + self.log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.2)

    def stop(self) -> None:
        stop_process(self.process)


def start_prometheus(workdir: Path, targets: list[str], rules: list[Path]) -> Prometheus:
    """Prometheus scraping ``targets`` (host:port) as job ``smtpproxy``, ready to query."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed: apt-get install prometheus")
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(CONFIG.format(rules=json.dumps([str(r) for r in rules]), targets=json.dumps(targets)))
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'prometheus-data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
        )
    prometheus = Prometheus(port, process, log_path)

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    try:
        prometheus.wait("readiness", ready)
    except Exception:
        prometheus.stop()
        raise
    return prometheus
