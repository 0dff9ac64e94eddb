"""RFC 3461 delivery status notification parameters, checked before they are passed on.

The proxy does not generate DSNs (it queues nothing); it passes the client's requests to an
upstream that offers DSN, which then sends them. So the parameters are only accepted when
the upstream offers DSN, and only in their exact RFC 3461 syntax: an upstream must never see
a value it could misread, and a client must hear at once (``501``) that a value is wrong.

- MAIL: ``RET=FULL|HDRS``, ``ENVID=xtext`` (at most 100 characters).
- RCPT: ``NOTIFY=NEVER`` or a list of ``SUCCESS``, ``FAILURE``, ``DELAY``;
  ``ORCPT=addr-type;xtext`` (at most 500 characters).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["MAIL_PARAMS", "RCPT_PARAMS", "check_mail_params", "check_rcpt_params"]

MAIL_PARAMS = frozenset({"RET", "ENVID"})
RCPT_PARAMS = frozenset({"NOTIFY", "ORCPT"})

_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})+")
"""RFC 3461 4: xchar (33-126 but '+' and '='), or '+' and two upper-case hex digits."""
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
_NOTIFY_WORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})


def _xtext(value: str) -> bool:
    return _XTEXT.fullmatch(value) is not None


def check_mail_params(params: Mapping[str, str | None]) -> str | None:
    """What is wrong with the MAIL DSN parameters, or None when they are valid."""
    ret = params.get("RET", "FULL")
    if "RET" in params and (ret is None or ret.upper() not in ("FULL", "HDRS")):
        return "RET must be FULL or HDRS"
    if "ENVID" in params:
        envid = params["ENVID"]
        if envid is None or len(envid) > 100 or not _xtext(envid):
            return "ENVID must be xtext of at most 100 characters"
    return None


def check_rcpt_params(params: Mapping[str, str | None]) -> str | None:
    """What is wrong with the RCPT DSN parameters, or None when they are valid."""
    if "NOTIFY" in params:
        notify = params["NOTIFY"]
        words = notify.upper().split(",") if notify else []
        if words != ["NEVER"] and (not words or not set(words) <= _NOTIFY_WORDS
                                   or len(set(words)) != len(words)):
            return "NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY"
    if "ORCPT" in params:
        orcpt = params["ORCPT"]
        kind, sep, address = (orcpt or "").partition(";")
        if (not sep or _ATOM.fullmatch(kind) is None or not _xtext(address)
                or len(orcpt or "") > 500):
            return "ORCPT must be addr-type;xtext of at most 500 characters"
    return None
