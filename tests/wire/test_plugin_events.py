"""Plugins log structured events in the proxy's own line format (smtpproxy.EventLog).

A real proxy process in each log format, a first-party plugin (access) and a hostile local
plugin that tries to forge the session id, the level and whole lines through its fields,
and a plugin that raises (the core's plugin_error line).
"""

from __future__ import annotations

import json
import logging
import re
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpproxy.eventlog import EventLog, JsonFormatter, KeyValueFormatter, current_session
from tests.daemons import LogLines

EXE = [sys.executable, "-m", "smtpproxy"]

HOSTILE = '''
from smtpproxy import EventLog, hookimpl

log = EventLog("site.hostile")


class Hostile:
    @hookimpl
    def mail_from(self, sender):
        log.warning("hostile", sid="forged", level="debug", ts="1999", **{"a b": "x"},
                    value="line\\r\\nts=1 level=info event=fake sid=forged", sender=sender.text)


class Boom:
    @hookimpl
    def rcpt_to(self, recipient):
        raise RuntimeError("boom at rcpt")
'''


def _run(tmp_path: Path, fmt: str) -> list[str]:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "hostile16.py").write_text(HOSTILE)
    config = tmp_path / "smtpproxy.yaml"
    config.write_text(
        "listeners:\n  - address: 127.0.0.1\n    port: 0\n"
        "delivery:\n  type: maildir\n  path: mail\n"
        f"logging:\n  format: {fmt}\n"
        "plugin_paths: [site]\n"
        "plugins:\n"
        "  - name: hostile\n    use: hostile16:Hostile\n"
        "  - name: access\n    settings:\n      sender:\n        deny:\n          rules: [spam@bad.example]\n"
        "  - name: boom\n    use: hostile16:Boom\n    on_error: continue\n"
    )
    proc = subprocess.Popen([*EXE, "run", "-c", str(config)], stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert proc.stderr is not None
        lines = LogLines(proc.stderr)
        listening = lines.wait_line(r"listening")
        port = int(re.search(r"port\W+(\d+)", listening).group(1))  # type: ignore[union-attr]
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("client.test")
            with pytest.raises(smtplib.SMTPSenderRefused):
                client.sendmail("spam@bad.example", ["bob@localhost"], b"Subject: x\r\n\r\nx\r\n")
            client.rset()
            assert client.sendmail("ok@good.example", ["bob@localhost"], b"Subject: y\r\n\r\ny\r\n") == {}
        lines.wait_line(r"disconnect")
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=30)
        return [line for line in "".join(lines.lines).splitlines() + rest.splitlines() if line]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _kv(line: str) -> dict[str, str]:
    fields = {}
    for match in re.finditer(r'([^\s=]+)=("(?:[^"\\]|\\.)*"|\S*)', line):
        value = match.group(2)
        fields[match.group(1)] = json.loads(value) if value.startswith('"') else value
    return fields


@pytest.mark.parametrize("fmt", ["kv", "json"])
def test_plugin_events_are_structured_lines_with_the_session_id(tmp_path: Path, fmt: str) -> None:
    lines = _run(tmp_path, fmt)
    records = [json.loads(line) for line in lines] if fmt == "json" else [_kv(line) for line in lines]
    assert all("ts" in r and "level" in r for r in records), lines  # every line is one whole record
    [connect] = [r for r in records if r.get("event") == "connect"]
    sid = connect["sid"]

    [denied] = [r for r in records if r.get("event") == "access"]
    assert (denied["sid"], denied["kind"], denied["value"], denied["deny"]) == (
        sid, "sender", "spam@bad.example", "spam@bad.example")
    assert "msg" not in denied and "logger" not in denied

    hostile = [r for r in records if r.get("event") == "hostile"]
    assert len(hostile) == 2
    for r in hostile:
        assert (r["sid"], r["level"]) == (sid, "warning")
        assert (r["sid_"], r["level_"], r["ts_"], r["a_b"]) == ("forged", "debug", "1999", "x")
        assert r["value"] == "line\r\nts=1 level=info event=fake sid=forged"
    assert not any(r.get("event") == "fake" for r in records)

    errors = [r for r in records if r.get("event") == "plugin_error"]
    assert len(errors) == 1
    assert (errors[0]["sid"], errors[0]["plugin"], errors[0]["phase"], errors[0]["action"]) == (
        sid, "boom", "rcpt_to", "continue")
    assert "boom at rcpt" in errors[0]["error"]


def test_operations_lists_every_event_the_code_logs() -> None:
    root = Path(__file__).resolve().parents[2]
    names: set[str] = set()
    for path in [*(root / "smtpproxy").rglob("*.py"), *(root / "plugins").glob("*.py")]:
        text = path.read_text()
        names |= set(re.findall(r'\bevent\(\s*"(\w+)"', text))
        names |= set(re.findall(r'\blog\.(?:debug|info|warning|error)\(\s*"(\w+)"', text))
        names |= set(re.findall(r'"event=(\w+)', text))
    assert {"spf", "dkim", "dkim_sign", "plugin_error", "upstream_rcpt"} <= names
    documented = set(re.findall(r"`(?:event=)?(\w+)", (root / "docs" / "operations.md").read_text()))
    assert sorted(names - documented) == []


# -- the line format, whatever a plugin puts in its fields ------------------------------


def _format(formatter: logging.Formatter, name: str, fields: dict[str, str]) -> str:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log = EventLog("test.hostile.fields")
    handler = Keep()
    log.logger.addHandler(handler)
    log.logger.setLevel(logging.INFO)
    token = current_session.set("0123456789ab")
    try:
        log.info(name, **fields)
    finally:
        current_session.reset(token)
        log.logger.removeHandler(handler)
    [record] = records
    current_session.set("0123456789ab")
    try:
        return formatter.format(record)
    finally:
        current_session.set(None)


@given(st.text(min_size=1, max_size=20), st.dictionaries(st.text(max_size=12), st.text(max_size=40), max_size=6))
def test_any_fields_make_one_kv_line_that_parses_back(name: str, fields: dict[str, str]) -> None:
    line = _format(KeyValueFormatter(), name, fields)
    assert "\n" not in line and "\r" not in line
    parsed = _kv(line)
    assert parsed["event"] == name and parsed["sid"] == "0123456789ab" and parsed["level"] == "info"
    assert len(parsed) == 4 + len({_safe(k) for k in fields})


@given(st.dictionaries(st.text(max_size=12), st.text(max_size=40), max_size=6))
def test_any_fields_make_one_json_object(fields: dict[str, str]) -> None:
    line = _format(JsonFormatter(), "plugin_event", fields)
    assert "\n" not in line
    parsed = json.loads(line)
    assert (parsed["event"], parsed["sid"], parsed["level"]) == ("plugin_event", "0123456789ab", "info")


def _safe(key: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.:-]", "_", key) or "_"
    return name + "_" if name in {"ts", "level", "event", "sid", "logger", "msg", "exc"} else name
