"""config/prometheus/smtpproxy-alerts.yml: valid for promtool, and firing in a real Prometheus
after a real outage.

A private Prometheus (Debian's) scrapes a proxy that delivers to a private Postfix; the
Postfix is stopped, a client is deferred at RCPT, and the outage alerts must fire. The test
evaluates a copy of the shipped rules whose ``for:`` durations are cut to two seconds (the
expressions are the shipped ones, unchanged): waiting two minutes is a soak, not a test.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import ProxyFactory, Talk, port_of
from tests.postfix_instance import PostfixFactory
from tests.postfix_instance import postfix_factory as postfix_factory  # noqa: PLC0414
from tests.prometheus_server import start_prometheus
from tests.wire.test_metrics import health_port

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "config" / "prometheus" / "smtpproxy-alerts.yml"
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"
MESSAGE = b"From: a@src.test\r\nTo: bob@dest.test\r\nSubject: hi\r\n\r\nhello\r\n"


def test_promtool_accepts_the_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed: apt-get install prometheus")
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 10 rules found" in result.stdout


def test_every_rule_queries_served_metrics_only() -> None:
    """The names come from the proxy's own registry (test_grafana_dashboard checks the labels
    of a real scrape); a typo here would be a rule that never fires."""
    from smtpproxy.metrics import PrometheusRecorder

    recorder = PrometheusRecorder(lambda: 0, lambda: 0)
    served = {s.name for family in recorder.registry.collect() for s in family.samples}
    served |= {f.name + "_total" for f in recorder.registry.collect() if f.type == "counter"}
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    for rule in rules:
        names = set(re.findall(r"\b(?:smtpproxy|process)_\w+", rule["expr"]))
        assert names <= served, (rule["alert"], names - served)


def test_the_restart_alert_counts_starts_not_scrapes(tmp_path: Path) -> None:
    """``promtool test rules`` on the shipped rule: three restarts of one proxy in 30 minutes
    fire it, a steady proxy and one that restarted twice do not; a restart between two scrapes
    (a new start time, no failed scrape) counts like any other."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed: apt-get install prometheus")
    series = {"a:9125": "100 100 400 400 700 1000 1000 1000", "b:9125": "100x7",
              "c:9125": "100 100 400 400 700 700 700 700"}
    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": f'process_start_time_seconds{{job="smtpproxy",instance="{instance}"}}',
                              "values": values} for instance, values in series.items()],
            "alert_rule_test": [{
                "eval_time": "7m", "alertname": "SmtpproxyRestarting",
                "exp_alerts": [{"exp_labels": {"severity": "warning", "job": "smtpproxy", "instance": "a:9125"},
                                "exp_annotations": {"summary": "a:9125: restarted 3 times in 30 minutes"}}],
            }],
        }],
    }
    (tmp_path / "restart-test.yml").write_text(yaml.safe_dump(tests))
    result = subprocess.run([promtool, "test", "rules", str(tmp_path / "restart-test.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("alert", "series", "summary"), [
    ("SmtpproxyHistoryDropped", 'smtpproxy_history_entries_total{{job="smtpproxy",instance="{instance}",result="dropped"}}',
     "a:9125: 300 history entries dropped in 10 minutes: the store is slow or down"),
    ("SmtpproxyPasswordSpraying",
     'smtpproxy_auth_throttle_events_total{{job="smtpproxy",instance="{instance}",event="auth_spraying"}}',
     "a:9125: password spraying seen in the last 15 minutes (see event=auth_spraying)"),
])
def test_a_counter_alert_fires_on_an_increase_only(tmp_path: Path, alert: str, series: str, summary: str) -> None:
    """``promtool test rules``: the counter rising on one proxy fires for it alone; one that
    stays where it was (however high) and one that restarted from 0 do not."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed: apt-get install prometheus")
    values = {"a:9125": "0 0 100 200 300 300", "b:9125": "500x5", "c:9125": "40 40 0 0 0 0"}
    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": series.format(instance=instance), "values": v}
                             for instance, v in values.items()],
            "alert_rule_test": [{
                "eval_time": "5m", "alertname": alert,
                "exp_alerts": [{"exp_labels": {"severity": "warning", "instance": "a:9125"},
                                "exp_annotations": {"summary": summary}}],
            }],
        }],
    }
    (tmp_path / "counter-test.yml").write_text(yaml.safe_dump(tests))
    result = subprocess.run([promtool, "test", "rules", str(tmp_path / "counter-test.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_the_outage_alerts_fire_in_prometheus_after_a_real_upstream_outage(
    proxy_factory: ProxyFactory, postfix_factory: PostfixFactory, tmp_path: Path
) -> None:
    postfix = postfix_factory()
    proxy = await proxy_factory(upstream=postfix.port,
                                metrics={"enabled": True, "port": 0, "ready_cache": 0.5})
    fast = tmp_path / "alerts-fast.yml"
    fast.write_text(re.sub(r"(?m)^(\s+for: )\S+$", r"\g<1>2s", RULES.read_text()))
    prometheus = start_prometheus(tmp_path, [f"127.0.0.1:{health_port(proxy)}"], [fast])
    try:
        client = await Talk.open(port_of(proxy))
        await client.hello()
        assert (await client.send_message("a@src.test", ["bob@dest.test"], MESSAGE))[0] == 250
        await client.close()

        def scraped_healthy() -> bool:
            # A few scrapes of the healthy proxy, so the outage is an increase from 0.
            result = prometheus.api("query", query="count_over_time(smtpproxy_delivery_ready[1m])")["result"]
            return bool(result) and float(result[0]["value"][1]) >= 3

        await asyncio.to_thread(prometheus.wait, "scrapes", scraped_healthy)
        assert await asyncio.to_thread(prometheus.alerts) == {}

        await asyncio.to_thread(postfix.stop)
        client = await Talk.open(port_of(proxy))
        await client.hello()
        assert (await client.cmd("MAIL FROM:<a@src.test>"))[0] == 250
        code, text = await client.cmd("RCPT TO:<bob@dest.test>")
        assert (code, text) == (451, "4.4.1 Upstream mail server not reachable, try again later")
        await client.close()

        wanted = {"SmtpproxyDeliveryDown", "SmtpproxyUpstreamConnectFailures", "SmtpproxyUpstreamTempfailing"}

        def firing() -> dict[str, str]:
            alerts = prometheus.alerts()
            return alerts if all(alerts.get(name) == "firing" for name in wanted) else {}

        alerts = await asyncio.to_thread(prometheus.wait, "the outage alerts firing", firing)
        assert set(alerts) == wanted, alerts  # and nothing else

        # The dashboard's "Delivery failures" panel shows the outage (it stayed empty when
        # only end-of-DATA failures were counted): the RCPT-time tempfail, the failed connect.
        [panel] = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["title"] == "Delivery failures"]
        shown = {}
        for target in panel["targets"]:
            expr = target["expr"].replace("$instance", ".*").replace("$__rate_interval", "1m")
            result = await asyncio.to_thread(prometheus.api, "query", query=expr)
            shown[target["legendFormat"]] = sorted(
                (r["metric"], float(r["value"][1])) for r in result["result"] if float(r["value"][1]) > 0)
        assert [m for m, _ in shown["at RCPT: {{result}}"]] == [{"result": "tempfail"}], shown
        assert [m for m, _ in shown["cannot connect: {{upstream}}"]] == [
            {"upstream": f"127.0.0.1:{postfix.port}"}], shown
        assert shown["at DATA: {{backend}} {{result}}"] == [], shown  # nothing reached DATA
    finally:
        prometheus.stop()
