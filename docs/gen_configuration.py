"""Generate docs/configuration.md from the configuration models' field descriptions.

Run ``python docs/gen_configuration.py > docs/configuration.md``; a test fails when the
committed page and the models disagree, so the reference cannot drift from the code.
"""

from __future__ import annotations

import ipaddress
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from smtpproxy import config as c
from smtpproxy.config import policies as ps
from smtpproxy.config import schema
from smtpproxy.config import tables as ts
from smtpproxy.config.console import ConsoleLDAP

SECTIONS: list[tuple[str, type[BaseModel], str]] = [
    ("(top level)", c.Config, "The whole file."),
    ("listeners[]", c.Listener, "Each entry opens one listening socket."),
    ("listeners[].tls", c.ListenerTLS, "STARTTLS (or implicit TLS) for clients of that listener."),
    ("listeners[].auth", c.ListenerAuth,
     "SMTP AUTH (PLAIN, LOGIN) on a submission listener; offered only once the connection is encrypted."),
    ("limits", c.Limits, "Protocol limits and timeouts; each is enforced with a clear SMTP reply."),
    ("smtp", c.SmtpPolicy, "Protocol behaviour."),
    ("relay", c.Relay, "Which recipients are accepted from whom; the guard against open relaying."),
    ("delivery (type: maildir)", c.MaildirDeliveryConfig, "The embedded default: a local Maildir."),
    ("delivery (type: smtp)", c.SmtpDeliveryConfig, "Forward to an upstream MTA with aiosmtplib."),
    ("quarantine", c.Quarantine, "Where quarantined messages are kept."),
    ("plugins[]", c.PluginSpec, "The plugin chain, in the order it runs."),
    ("policies[]", ps.PolicyGroup,
     "A policy group (docs/multi-domain.md): who it is for, and what it changes; first match wins."),
    ("policies[].plugins.NAME", ps.PluginOverride, "What a group changes about one plugin."),
    ("dns", c.DNS, "The resolver every plugin shares."),
    ("milter", c.Milter,
     "Milter mode: `smtpproxy milter` serves the chain to Postfix (docs/deploy-milter.md)."),
    ("policy", c.Policy,
     "Policy mode: `smtpproxy policy` serves the chain to Postfix's check_policy_service "
     "(docs/deploy-policy.md)."),
    ("console", schema.Console,
     "The web console in `smtpproxy web`: its accounts and its session cookie (docs/console.md)."),
    ("console.ldap", ConsoleLDAP,
     "Console sign-in against LDAP (`console.accounts: ldap`): a bind as the person, roles from groups."),
    ("logging", c.Logging, "Log format and level (logs go to stderr)."),
    ("metrics", c.Metrics,
     "Prometheus /metrics, /healthz and /readyz over HTTP (docs/operations.md)."),
    ("login_throttle", c.LoginThrottle,
     "Brakes on password guessing at SMTP AUTH, for every listener with auth (docs/submission.md)."),
    ("sender_login", c.SenderLogin,
     "Which logins own which sender addresses, on listeners with auth (docs/submission.md)."),
    *[(f"tables.NAME (type: {kind})", model, intro) for kind, model, intro in [
        ("inline", ts.InlineTable, "A [lookup table](tables.md) written in the configuration file."),
        ("file", ts.FileTable, "A table file of 'key value' lines, re-read at reload."),
        ("regexp", ts.RegexpTable, "Regular expressions tried in order; the first match answers."),
        ("redis", ts.RedisTable, "A table in Redis."),
        ("sqlite", ts.SQLiteTable, "A query on an SQLite database file."),
        ("postgresql", ts.PostgresTable, "A query on PostgreSQL."),
        ("ldap", ts.LDAPTable, "An LDAP search."),
    ]],
]


def type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return type_name(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"list of {type_name(typing.get_args(annotation)[0])}"
    if origin is dict:
        return "mapping"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if annotation is Path:
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field: Any) -> str:
    if field.is_required():
        return "**required**"
    value = field.default_factory() if field.default is PydanticUndefined else field.default
    if isinstance(value, BaseModel):
        return "(see section)"
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return "(see section)"
    if isinstance(value, Path):
        return f"`{value}`"
    if value is None:
        return "none"
    if isinstance(value, list) and value and all(isinstance(v, ipaddress._BaseNetwork) for v in value):
        return f"`{[str(v) for v in value]}`"  # as written in YAML, not as Python's repr
    return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def render() -> str:
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by docs/gen_configuration.py from the models in smtpproxy/config/ "
        "(schema.py assembles them). "
        "Do not edit. -->",
        "",
        "smtpproxy reads one YAML file (`smtpproxy run -c FILE`; without `-c` it runs on the",
        "embedded default, i.e. every default below and an SQLite store in `./smtpproxy.db`).",
        "`smtpproxy check-config -c FILE` validates",
        "it, and every error names the file, line, column and key. `${NAME}` and `${NAME:-default}`",
        "in values are replaced from the environment, and `$$` is a literal `$`. Relative paths",
        "are resolved against the directory of the configuration file. Unknown keys are errors.",
        "An annotated example is in [`config/smtpproxy.yaml`](example-config.md).",
        "",
    ]
    for title, model, intro in SECTIONS:
        out += [f"## `{title}`", "", intro, "", "| key | type | default | meaning |",
                "| --- | --- | --- | --- |"]
        for name, field in model.model_fields.items():
            description = (field.description or "").replace("|", "\\|")
            kind, default = type_name(field.annotation), default_text(field).replace("|", "\\|")
            out.append(f"| `{name}` | {kind} | {default} | {description} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")
