"""What an admin may ask a plugin to do with a result: the shared ``actions:`` vocabulary.

Every first-party plugin that classifies mail (SPF, DKIM, DMARC, DNSBL, ...) maps each of
its results to one action, configured like ``fail: reject``, ``softfail: 3.5`` (a score) or
``temperror: tempfail``. One helper turns that into a Verdict, so all plugins behave alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Annotated, Literal

from pydantic import Field

from smtpproxy import Verdict

ActionName = Literal["continue", "reject", "tempfail", "quarantine"]
ActionSpec = ActionName | Annotated[float, Field(allow_inf_nan=False)]
"""A named action, or a (finite) number: continue and add that many points to the score."""


def verdict_for(
    action: ActionSpec,
    *,
    reject_text: str,
    tempfail_text: str,
    reason: str,
    tags: tuple[str, ...] = (),
    reject_enhanced: str = "5.7.1",
    tempfail_enhanced: str = "4.7.1",
) -> Verdict | None:
    """The verdict for one configured action, carrying the tags whatever the action;
    None only for a plain continue without tags."""
    if isinstance(action, int | float) and not isinstance(action, bool):
        return Verdict.cont(score=float(action), reason=reason, tags=tags)
    if action == "reject":
        verdict = Verdict.reject(reject_text, code=550, enhanced=reject_enhanced, reason=reason)
    elif action == "tempfail":
        verdict = Verdict.tempfail(tempfail_text, code=451, enhanced=tempfail_enhanced, reason=reason)
    elif action == "quarantine":
        verdict = Verdict.quarantine(reason)
    else:
        return Verdict.cont(reason=reason, tags=tags) if tags else None
    return replace(verdict, tags=tags)


def check_reply_template(value: str, placeholders: Mapping[str, str]) -> str:
    """Validate an admin's reply text at load time: one line, only the known placeholders.

    ``placeholders`` maps each name to a sample value, so formatting is tried for real.
    """
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must not contain control characters (it becomes an SMTP reply line)")
    try:
        value.format_map(placeholders)
    except KeyError as exc:
        names = ", ".join("{" + k + "}" for k in placeholders)
        raise ValueError(f"unknown placeholder {{{exc.args[0]}}}; available: {names}") from None
    except (ValueError, IndexError) as exc:
        raise ValueError(f"not a valid template ({exc}); write a literal brace as {{{{ or }}}}") from None
    return value
