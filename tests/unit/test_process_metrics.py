"""The process metrics where the shipped units' sandbox hides /proc/stat (``ProcSubset=pid``):
prometheus_client's collector then reports nothing; ours gives the same start time as it does
with the whole of /proc (tests/wire/test_units_under_systemd.py reads them under real systemd)."""

from __future__ import annotations

from pathlib import Path

import pytest

prometheus_client = pytest.importorskip("prometheus_client")

from smtpproxy.metrics import register_process_metrics  # noqa: E402


@pytest.fixture
def pid_only_proc(tmp_path: Path) -> Path:
    """A /proc as ProcSubset=pid leaves it: this process's directory, no /proc/stat."""
    (tmp_path / "self").symlink_to("/proc/self")
    return tmp_path


def test_prometheus_clients_collector_reports_nothing_there(pid_only_proc: Path) -> None:
    registry = prometheus_client.CollectorRegistry()
    prometheus_client.ProcessCollector(proc=str(pid_only_proc), registry=registry)
    assert registry.get_sample_value("process_start_time_seconds") is None


def test_ours_reports_the_start_time_cpu_memory_and_files(pid_only_proc: Path) -> None:
    whole = prometheus_client.CollectorRegistry()
    prometheus_client.ProcessCollector(registry=whole)
    registry = prometheus_client.CollectorRegistry()
    register_process_metrics(registry, proc=str(pid_only_proc))
    started = registry.get_sample_value("process_start_time_seconds")
    expected = whole.get_sample_value("process_start_time_seconds")
    assert started is not None and expected is not None
    assert abs(started - expected) < 1.0
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
        assert (registry.get_sample_value(name) or 0) > 0, name


def test_without_a_boot_clock_or_a_proc_nothing_breaks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """macOS: no /proc and no CLOCK_BOOTTIME; the metrics endpoint still works, without them."""
    import time

    monkeypatch.delattr(time, "CLOCK_BOOTTIME")
    registry = prometheus_client.CollectorRegistry()
    register_process_metrics(registry, proc=str(tmp_path))
    assert registry.get_sample_value("process_start_time_seconds") is None
    assert prometheus_client.generate_latest(registry) == b""
