"""The ``delivery`` section: a Maildir, or upstream SMTP servers with their pools and routes.

Part of the schema (:mod:`smtpproxy.config.schema` assembles it); docs/configuration.md is
generated from these models.
"""

import re
from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from smtpproxy.config.fields import (
    ConfigPath,
    ExistingFile,
    HeloName,
    Host,
    RelayDomain,
    field_error,
)
from smtpproxy.config.section import Section as _Model


class MaildirDeliveryConfig(_Model):
    """Deliver accepted mail into a local Maildir."""

    type: Literal["maildir"] = Field(default="maildir", description="Selects Maildir delivery.")
    path: ConfigPath = Field(
        default=Path("mail"), description="Maildir directory; relative to the config file."
    )


class Upstream(_Model):
    """One next-hop SMTP server."""

    host: Host = Field(description="Host name or IP address of the server.")
    port: int = Field(default=25, strict=True, ge=1, le=65535, description="TCP port of the server.")
    priority: int = Field(
        default=10, strict=True, ge=0,
        description="Lower is tried first; servers of equal priority share the load by weight.",
    )
    weight: int = Field(
        default=1, strict=True, ge=1, description="Share of messages among servers of equal priority."
    )


class Route(_Model):
    """Recipients of these domains go to their own upstream servers."""

    name: str | None = Field(
        default=None,
        description=(
            "A name for the route (a-z, 0-9, '_', '.', '-'; not 'default' nor 'routeN'): in logs, "
            "and for a policy group's `route:` (docs/multi-domain.md)."
        ),
    )
    domains: list[RelayDomain] = Field(
        min_length=1, description="Recipient domains ('example.com' or '*.example.com') for this route."
    )
    upstreams: list[Upstream] = Field(min_length=1, description="The servers for this route.")

    @field_validator("name")
    @classmethod
    def _name_valid(cls, value: str | None) -> str | None:
        if value is not None and (not re.fullmatch(r"[a-z0-9_.-]+", value) or value == "default"
                                  or re.fullmatch(r"route[0-9]+", value)):
            raise field_error("route_name", "a route name uses a-z, 0-9, '_', '.', '-' and is neither "
                              f"'default' nor 'routeN' (the names of unnamed routes) (got {value!r})")
        return value


class UpstreamAuth(_Model):
    """Credentials for a smarthost that requires SMTP AUTH (sent only over TLS)."""

    username: str = Field(min_length=1, description="User name; use ${ENV_VAR} to keep it out of the file.")
    password: str = Field(min_length=1, description="Password; use ${ENV_VAR} to keep it out of the file.")


class UpstreamPool(_Model):
    """Reuse of idle upstream connections."""

    max_idle: int = Field(
        default=32, strict=True, ge=0,
        description=(
            "Idle connections kept per server for any client's next message; 0 turns reuse off. "
            "Fewer than the deliveries in flight close and reopen connections (bench/README.md: "
            "at concurrency 100, 4 cost 25 % more CPU per message). Each idle connection to "
            "Postfix holds one smtpd process. Not counted here: a connection waiting for its "
            "own client session's next message (until the session ends, then it joins these, or "
            "is closed when its XCLIENT named the client's port)."
        ),
    )
    idle_timeout: float = Field(
        default=30, strict=True, gt=0, allow_inf_nan=False,
        description="Seconds an idle connection is kept before it is closed.",
    )
    max_messages: int = Field(
        default=100, strict=True, ge=1, description="Messages sent over one connection before it is closed."
    )


class SmtpDeliveryConfig(_Model):
    """Forward accepted mail to other SMTP servers (Postfix, Exchange, a smarthost)."""

    type: Literal["smtp"] = Field(description="Selects SMTP forwarding.")
    host: Host | None = Field(
        default=None, description="Host name or IP address of the single next-hop server (or use upstreams)."
    )
    port: int = Field(default=25, strict=True, ge=1, le=65535, description="TCP port of `host`.")
    upstreams: list[Upstream] = Field(
        default_factory=list,
        description="Several next-hop servers with priority and weight, tried in order on failure.",
    )
    routes: list[Route] = Field(
        default_factory=list,
        description=(
            "Per-domain routes; recipients of other domains use the default upstreams. A transaction "
            "goes to one route: recipients of another route get 452 4.5.3 and are sent again by the client."
        ),
    )
    rcpt_mode: Literal["at_data", "relay"] = Field(
        default="relay",
        description=(
            "'relay' (default, as Postfix's own before-queue proxy): each RCPT is asked of the "
            "upstream at once and its answer relayed. 'at_data': the upstream is contacted only "
            "after the plugins accepted the whole message; if it then refuses some recipients "
            "the client gets 451 for the message, and when it sends again those recipients get "
            "the upstream's refusal at RCPT (remembered for refusal_memory seconds) and the "
            "others are delivered."
        ),
    )
    refusal_memory: float = Field(
        default=3600,
        strict=True,
        ge=0,
        allow_inf_nan=False,
        description=(
            "Seconds an upstream's refusal of one recipient at delivery time (per route, sender "
            "and recipient) is remembered and given at RCPT when the client sends again, so the "
            "other recipients are not deferred with it forever (0: never)."
        ),
    )
    client_identity: Literal["auto", "xclient", "xforward", "none"] = Field(
        default="auto",
        description=(
            "Pass the original client to the upstream: XCLIENT (Postfix), XFORWARD, or 'auto' "
            "(XCLIENT when offered, else XFORWARD when offered; when neither is offered a warning "
            "is logged and /readyz and a metric say so). With 'xclient' or 'xforward' a missing "
            "or refused command is a 451 for the client and a warning with the reason."
        ),
    )
    pipelining: bool = Field(
        default=True,
        strict=True,
        description=(
            "Pipeline commands (RFC 2920) when the upstream offers PIPELINING: XFORWARD or the "
            "reuse probe, MAIL, the RCPTs and (rcpt_mode at_data) DATA go in one write, so a "
            "message on a reused connection costs one round trip plus the data (three in relay "
            "mode, where DATA waits for the client; two where the upstream offers CHUNKING, whose "
            "one BDAT carries the message without a 354). 'false' sends one command at a time "
            "(Postfix: smtp_discard_ehlo_keywords = pipelining)."
        ),
    )
    auth: UpstreamAuth | None = Field(default=None, description="SMTP AUTH to the upstream (smarthost).")
    pool: UpstreamPool = Field(default=UpstreamPool(), description="Connection reuse.")
    down_backoff: float = Field(
        default=30, strict=True, gt=0, allow_inf_nan=False,
        description="Seconds a server that failed to connect or greet is skipped before it is tried again.",
    )
    tls: Literal["none", "opportunistic", "starttls", "implicit"] = Field(
        default="opportunistic",
        description=(
            "'none': plaintext only; 'opportunistic': STARTTLS when offered, certificate not "
            "verified; 'starttls': STARTTLS required and verified; 'implicit': TLS from connect, "
            "verified."
        ),
    )
    tls_verify: bool = Field(
        default=True,
        strict=True,
        description="Verify the server certificate and name in 'starttls' and 'implicit' modes.",
    )
    ca_file: ExistingFile | None = Field(
        default=None,
        description="PEM bundle of CAs to trust instead of the system store; relative to the config file.",
    )
    tls_hostname: Host | None = Field(
        default=None, description="Name expected in the server certificate; defaults to host."
    )
    client_cert: ExistingFile | None = Field(
        default=None,
        description="PEM client certificate (with key, or see client_key) for TLS to the upstream.",
    )
    client_key: ExistingFile | None = Field(default=None, description="PEM key for client_cert.")
    helo_name: HeloName | None = Field(
        default=None, description="Name sent in EHLO/HELO; defaults to the top-level hostname."
    )
    connect_timeout: float = Field(
        default=30,
        strict=True,
        gt=0,
        allow_inf_nan=False,
        description="Seconds allowed to connect and read the greeting.",
    )
    command_timeout: float = Field(
        default=60,
        strict=True,
        gt=0,
        allow_inf_nan=False,
        description="Seconds allowed for each SMTP command's reply.",
    )
    data_timeout: float = Field(
        default=300,
        strict=True,
        gt=0,
        allow_inf_nan=False,
        description=(
            "Seconds allowed to send the message and get the reply. The client waits 10 "
            "minutes for its reply to the end of data (RFC 5321 4.5.3.2.6) and that includes "
            "the data-phase plugins: keep their timeouts plus this well below 600, or a client "
            "that gives up retries a message the upstream accepted (a duplicate)."
        ),
    )

    @field_validator("routes")
    @classmethod
    def _route_names_unique(cls, routes: list[Route]) -> list[Route]:
        seen: dict[str, int] = {}
        for index, route in enumerate(routes):
            if route.name is not None and seen.setdefault(route.name, index) != index:
                raise field_error("duplicate_route",
                                  f"route name {route.name!r} is already used by routes[{seen[route.name]}]",
                                  loc_suffix=(index, "name"))
        return routes

    @property
    def route_names(self) -> list[str]:
        """The names policy groups may give as ``route:``: the named routes and ``default``."""
        return ["default", *(r.name for r in self.routes if r.name is not None)]

    @model_validator(mode="after")
    def _one_destination(self) -> "SmtpDeliveryConfig":
        if (self.host is None) == (not self.upstreams):
            both = self.host is not None
            raise PydanticCustomError(
                "delivery_destination",
                "give either 'host' (one server) or 'upstreams' (several)" + (", not both" if both else ""),
                {"loc_suffix": ("upstreams" if both else "host",), "show_input": False},
            )
        if self.auth is not None and self.tls == "none":
            raise PydanticCustomError(
                "auth_needs_tls",
                "upstream auth needs tls other than 'none' (passwords never go in plaintext)",
                {"loc_suffix": ("auth",), "show_input": False},
            )
        return self

    def default_upstreams(self) -> list[Upstream]:
        """The servers for recipients no route claims."""
        if self.host is not None:
            return [Upstream(host=self.host, port=self.port)]
        return list(self.upstreams)
