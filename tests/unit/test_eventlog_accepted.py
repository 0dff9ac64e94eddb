"""Which lines ``logging.accepted_commands: debug`` moves (eventlog.accepted_level): a step that
passed, never a refusal, a deferral, an upstream's refusal or a line above info."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from smtpproxy import eventlog

INFO, DEBUG, WARNING = logging.INFO, logging.DEBUG, logging.WARNING


@pytest.fixture
def quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eventlog._Accepted, "level", DEBUG)


@pytest.mark.parametrize(("name", "fields"), [
    ("connect", {"client": "192.0.2.1", "port": 4242}),
    ("helo", {"verb": "EHLO", "hostname": "x", "verdict": "continue"}),
    ("mail_from", {"sender": "a@b.test", "verdict": "accept", "by": "lists", "reply": 250}),
    ("rcpt_to", {"recipient": "b@c.test", "verdict": "continue"}),
    ("upstream_rcpt", {"recipient": "b@c.test", "reply": 250}),
    ("delivered", {"destination": "127.0.0.1:25", "reply": "250"}),
    ("disconnect", {"transactions": 1, "errors": 0}),
])
def test_a_step_that_passed_goes_to_debug(quiet: None, name: str, fields: dict[str, Any]) -> None:
    assert eventlog.accepted_level(name, INFO, fields) == DEBUG


@pytest.mark.parametrize(("name", "level", "fields"), [
    ("rcpt_to", INFO, {"recipient": "b@c.test", "verdict": "relay_denied"}),
    ("rcpt_to", INFO, {"recipient": "b@c.test", "verdict": "tempfail", "by": "greylist", "reply": 451}),
    ("rcpt_to", INFO, {"recipient": "b@c.test", "verdict": "quarantine", "by": "score"}),
    ("mail_from", INFO, {"sender": "x", "verdict": "syntax", "reply": 501}),
    ("upstream_rcpt", INFO, {"recipient": "b@c.test", "reply": 550}),
    ("rcpt_to", WARNING, {"recipient": "b@c.test", "verdict": "continue"}),
    ("message", INFO, {"decision": "delivered", "reply": "250 2.0.0"}),
    ("spf", INFO, {"result": "pass"}),
])
def test_anything_else_keeps_its_level(quiet: None, name: str, level: int, fields: dict[str, Any]) -> None:
    assert eventlog.accepted_level(name, level, fields) == level


def test_by_default_nothing_moves() -> None:
    assert eventlog._Accepted.level == INFO
    assert eventlog.accepted_level("connect", INFO, {}) == INFO
