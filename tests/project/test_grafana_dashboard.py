"""config/grafana-dashboard.json queries only metrics (and labels) that a real /metrics has.

The proxy runs with metrics on, real SMTP sessions go through it (delivered, refused at RCPT
and at DATA), and /metrics is scraped over HTTP; every metric name in every PromQL
expression of the dashboard (and of the alert examples in docs/operations.md) must be one
it serves, and every label a query groups by must be one of that metric's labels.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ProxyFactory, Sink, Talk, port_of
from tests.wire.test_metrics import METRICS, Gate, health_port, http

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "gauge": ("",), "info": ("_info",), "summary": ("_count", "_sum", "_created")}


def expressions(dashboard: dict[str, Any]) -> list[str]:
    found = []
    for panel in dashboard["panels"]:
        found.extend(target["expr"] for target in panel.get("targets", []))
    for variable in dashboard["templating"]["list"]:
        found.append(variable["definition"])
    return found


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(?:smtpproxy|process)_\w+", expr))  # ours, and prometheus_client's process metrics


def test_the_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
    assert len(expressions(dashboard)) >= 15


async def test_every_metric_the_dashboard_queries_is_served(proxy_factory: ProxyFactory, sink: Sink) -> None:
    server = await proxy_factory(Gate(), upstream=sink.port, **METRICS)
    client = await Talk.open(port_of(server))
    await client.hello()
    assert (await client.send_message("a@src.test", ["ok@dest.test"], b"Subject: hi\r\n\r\nhello\r\n"))[0] == 250
    assert (await client.cmd("MAIL FROM:<a@src.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<bad@dest.test>"))[0] == 550
    assert (await client.cmd("QUIT"))[0] == 221
    await client.close()
    status, _, body = await http(health_port(server), "/metrics")
    assert status == 200

    served: set[str] = set()
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body.decode()):
        served.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
        for sample in family.samples:
            served.add(sample.name)
            labels.setdefault(sample.name, set()).update(set(sample.labels) - {"le", "quantile"})
    assert "smtpproxy_messages_total" in served  # the scrape is real

    queries = expressions(json.loads(DASHBOARD.read_text()))
    operations = (ROOT / "docs" / "operations.md").read_text()
    blocks = re.findall(r"^```text\n(.*?)^```", operations, re.M | re.S)  # the alert examples
    queries += [line for block in blocks for line in block.splitlines() if "smtpproxy_" in line and "(" in line]
    queried: set[str] = set()
    for expr in queries:
        names = _metric_names(expr)
        queried |= names
        assert names <= served, f"{expr}: not served: {sorted(names - served)}"
        for name in names:
            for group in re.findall(r"\bby \(([^)]*)\)", expr):
                grouped = {g.strip() for g in group.split(",")} - {"le", "instance"}
                if labels.get(name):
                    assert grouped <= labels[name] | {lbl for n in names for lbl in labels.get(n, set())}, expr
    # Every metric family the proxy serves has a panel.
    families = {re.sub(r"_(total|bucket|count|sum|created)$", "", n) for n in served}
    shown = {re.sub(r"_(total|bucket|count|sum|created)$", "", n) for n in queried}
    assert families - shown == set()
