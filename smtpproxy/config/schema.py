"""The configuration schema: every section and key, its default and its description.

The listeners' sections live in :mod:`smtpproxy.config.listeners`, the delivery's in
:mod:`smtpproxy.config.delivery`, the lookup tables' in :mod:`smtpproxy.config.tables`;
:class:`Config` assembles them with the rest, here.
docs/configuration.md is generated from these models (docs/gen_configuration.py).
"""

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from smtpproxy.config.console import ConsoleLDAP
from smtpproxy.config.delivery import (
    MaildirDeliveryConfig,
    SmtpDeliveryConfig,
)
from smtpproxy.config.fields import (
    PLUGIN_NAME,
    USE_SPEC,
    ConfigPath,
    ExistingDirectory,
    ExistingFile,
    HeloName,
    IPAddress,
    Network,
    RelayDomain,
    field_error,
    seconds,
)
from smtpproxy.config.listen import parse_listen  # the one parser, shared with the milter server
from smtpproxy.config.listeners import Listener, LoginThrottle, SenderLogin
from smtpproxy.config.policies import PolicyGroup, check_policies
from smtpproxy.config.problems import describe_value
from smtpproxy.config.section import Section as _Model
from smtpproxy.config.tables import TABLE_NAME, TableConfig
from smtpproxy.networks import LOOPBACK

EMBEDDED_STORE = Path("smtpproxy.db")
"""The embedded default's store (no configuration file): an SQLite file in the current directory."""

MAX_WORKERS = 64
"""Most proxy processes ``workers`` may ask for (and what ``auto`` is capped at)."""


def cpu_count() -> int:
    """Cores this process may run on (its CPU affinity, not the machine's), 1..MAX_WORKERS."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        usable = os.cpu_count() or 1
    return max(1, min(usable, MAX_WORKERS))

# --------------------------------------------------------------------------- schema




class Limits(_Model):
    """Resource limits that protect the proxy from misbehaving or hostile clients."""

    max_message_size: int = Field(
        default=26214400,
        strict=True,
        gt=0,
        description="Largest accepted message in bytes, advertised via SIZE.",
    )
    max_recipients: int = Field(
        default=100, strict=True, gt=0, description="Most RCPT TO commands accepted per message."
    )
    max_line_length: int = Field(
        default=1000,
        strict=True,
        ge=1000,
        le=1_000_000,
        description=(
            "Longest message text line in bytes including CRLF (RFC 5321 minimum is 1000); "
            "a line the client dot-stuffed may carry that one extra dot (500 5.5.2 beyond)."
        ),
    )
    max_command_line: int = Field(
        default=512,
        strict=True,
        ge=512,
        le=65536,
        description="Longest SMTP command line in bytes including CRLF (RFC 5321 minimum is 512).",
    )
    max_commands: int = Field(
        default=10000, strict=True, gt=0,
        description=(
            "Most commands accepted in one session since its last accepted message "
            "(then 421); a session that keeps delivering mail is never cut off."
        ),
    )
    max_errors: int = Field(
        default=20,
        strict=True,
        gt=0,
        description="Protocol errors allowed per session before the proxy replies 421 and closes.",
    )
    max_sessions: int = Field(
        default=1000, strict=True, gt=0,
        description=("Most concurrent sessions across all listeners, counted when a connection is "
                     "accepted (before an implicit-TLS handshake); in milter mode, the MTA's connections."),
    )
    max_sessions_per_ip: int = Field(
        default=20,
        strict=True,
        gt=0,
        description="Most concurrent sessions from one client IP address (at most max_sessions).",
    )
    idle_timeout: float = Field(
        default=300,
        strict=True,
        gt=0,
        allow_inf_nan=False,
        description=(
            "Seconds to wait for the next command from the client before 421 and closing. "
            "Runs only while the proxy waits for the client, never while it waits on plugins "
            "or the upstream (their own timeouts bound those)."
        ),
    )
    data_timeout: float = Field(
        default=600,
        strict=True,
        gt=0,
        allow_inf_nan=False,
        description="Seconds of client silence allowed while receiving message data.",
    )
    session_timeout: float = Field(
        default=3600,
        strict=True,
        gt=0,
        allow_inf_nan=False,
        description="Longest total lifetime of one session in seconds.",
    )
    shutdown_grace: float = Field(
        default=30,
        strict=True,
        gt=0,
        allow_inf_nan=False,
        description=(
            "Seconds open sessions get to finish after SIGTERM before they are closed (a "
            "second SIGTERM ends it at once); a message already with the upstream still waits "
            "for the upstream's reply (docs/operations.md, Stopping)."
        ),
    )
    spool_threshold: int = Field(
        default=1048576,
        strict=True,
        ge=0,
        description=(
            "Messages larger than this many bytes are spooled to an unlinked temporary file "
            "while they are received and filtered, instead of held in memory (0: always)."
        ),
    )
    spool_directory: Path | None = Field(
        default=None,
        description="Where spool files go; the system temporary directory (TMPDIR) by default.",
    )

    @field_validator("max_sessions_per_ip")
    @classmethod
    def _per_ip_within_total(cls, value: int, info: ValidationInfo) -> int:
        total = info.data.get("max_sessions")
        if isinstance(total, int) and value > total:
            raise field_error(
                "limit_order",
                f"must not be larger than max_sessions ({total}) (got {value})",
            )
        return value


class SmtpPolicy(_Model):
    """SMTP protocol behaviour towards clients."""

    bare_newlines: Literal["reject", "normalize"] = Field(
        default="reject",
        description=(
            "What to do with a bare CR or LF in message data: reject it (550 5.5.2) or convert "
            "it to CRLF. A NUL octet is refused either way (550 5.6.0): it has no meaning to "
            "normalise to, and an upstream that strips NULs would see a '\\0.' line as the end "
            "of data."
        ),
    )
    smtputf8: bool = Field(
        default=True, strict=True, description="Advertise SMTPUTF8 and accept internationalized addresses."
    )
    pipelining: bool = Field(default=True, strict=True, description="Advertise PIPELINING (RFC 2920).")


class Relay(_Model):
    """Which recipients and clients the proxy accepts mail for."""

    domains: list[RelayDomain] = Field(
        default=["localhost", "*.localhost", "*.test", "*.example", "*.invalid"],
        description="Recipient domains accepted; '*.example.com' matches any subdomain of example.com.",
    )
    networks: list[Network] = Field(
        default=[],
        description="Client networks (CIDR, no host bits) allowed to relay to any domain.",
    )
    allow_authenticated: bool = Field(
        default=True, strict=True, description="Let authenticated clients relay to any domain."
    )
    allow_routing_local_parts: bool = Field(
        default=False,
        strict=True,
        description=(
            "Accept recipients whose local part routes elsewhere ('u%other.example@', "
            "'other.example!u@', '\"u@other.example\"@') from untrusted clients. Off: they get "
            "554 5.7.1, because an upstream that trusts the proxy would relay them on."
        ),
    )




class Quarantine(_Model):
    """Where messages that plugins quarantine are stored, for how long, and who releases them."""

    path: ConfigPath = Field(
        default=Path("quarantine"),
        description=(
            "Quarantine directory, used when no `store` is configured (a store keeps the "
            "quarantine itself; `smtpproxy quarantine import` moves a directory into it); "
            "relative to the config file."
        ),
    )
    retention_days: float = Field(
        default=30, strict=False, gt=0, allow_inf_nan=False,
        description="Days a message stays in a store's quarantine; then it is purged by itself.",
    )
    admin_only: list[str] = Field(
        default=[],
        description=(
            "Plugins (by name) whose quarantined messages only an admin may release (virus, "
            "dangerous attachment); a recipient's release link is refused for them."
        ),
    )


class History(_Model):
    """The message history in the store: every decision, searchable (`smtpproxy history`)."""

    enabled: bool = Field(default=True, strict=True, description="Record decisions (needs a `store`).")
    retention_days: float = Field(
        default=90, strict=False, gt=0, allow_inf_nan=False,
        description="Days a decision is kept; older ones are removed by themselves.",
    )
    batch_size: int = Field(
        default=200, strict=True, ge=1, le=10000, description="Decisions written in one transaction."
    )
    queue_limit: int = Field(
        default=10000, strict=True, ge=1, le=1_000_000,
        description=(
            "Decisions waiting for the store at most; beyond it (store slow or down) new ones "
            "are dropped and counted, never the mail."
        ),
    )
    flush_interval: float = seconds(1, "Seconds a decision waits at most before it is written.")


class Digest(_Model):
    """Quarantine digests (`smtpproxy digest`) and the release-link web app (`smtpproxy web`)."""

    domains: list[str] = Field(
        default=[],
        description=(
            "Recipient domains that get digests (opt-in; empty: nobody). Every recipient of "
            "these domains with messages held gets one."
        ),
    )
    base_url: str | None = Field(
        default=None, pattern=r"^https?://[^\s/]+(/[^\s]*)?$",
        description=(
            "Where recipients reach `smtpproxy web` (the links start with it), "
            "e.g. https://quarantine.example.com."
        ),
    )
    keys: list[ExistingFile] = Field(
        default=[],
        description=(
            "Files with the HMAC keys for links (32+ bytes each, e.g. `openssl rand -hex 32`); "
            "the first signs, all verify (rotation); relative to the config file."
        ),
    )
    link_days: float = Field(
        default=7, strict=False, gt=0, le=365, allow_inf_nan=False, description="Days a link works."
    )
    period_hours: float = Field(
        default=24, strict=False, gt=0, allow_inf_nan=False,
        description="A digest lists the messages held in this many hours before it (run it as often).",
    )
    sender: str | None = Field(
        default=None, description="The digest's envelope and From: address; default postmaster@hostname."
    )
    subject: str = Field(
        default="{count} message(s) held for you in quarantine",
        description="Subject line; `{count}` and `{recipient}` are filled in (translate it here).",
    )
    template: ExistingFile | None = Field(
        default=None,
        description=(
            "A text file for the body instead of the built-in English one, with `{recipient}`, "
            "`{count}`, `{messages}` and `{days}` (docs/operations.md, \"Digests\")."
        ),
    )
    address: IPAddress = Field(default="127.0.0.1", description="Where `smtpproxy web` listens.")
    port: int = Field(default=8026, strict=True, ge=0, le=65535, description="Its TCP port.")


class Console(_Model):
    """The web console in `smtpproxy web` (docs/console.md): on when `users` or `accounts` is set."""

    users: ExistingFile | None = Field(
        default=None,
        description=(
            "Accounts file, one `name:hash:role[:domains]` line each (bcrypt or Argon2 hash as for "
            "SMTP AUTH; role `admin`, `domain` with comma-separated domains, or `recipient` whose "
            "name is the address); relative to the config file."
        ),
    )
    accounts: str | None = Field(
        default=None, pattern=r"^(table:[a-z0-9_.-]+|ldap)$",
        description=(
            "Accounts from elsewhere instead of `users`: `table:NAME`, a lookup table that answers "
            "a sign-in name with `hash:role[:domains]`; or `ldap`, a bind as the person "
            "(`console.ldap`)."
        ),
    )
    ldap: ConsoleLDAP | None = Field(
        default=None, description="The directory for `accounts: ldap` (docs/console.md).")
    secure_cookie: bool = Field(
        default=True,
        description="Send the session cookie over HTTPS only (false only to try it on plain HTTP).",
    )
    session_hours: float = Field(
        default=8, strict=False, gt=0, le=720, allow_inf_nan=False,
        description="Hours a console sign-in lasts at most.",
    )
    idle_minutes: float = Field(
        default=60, strict=False, gt=0, le=43200, allow_inf_nan=False,
        description="Minutes without a request after which a console session ends.",
    )
    proxies: list[IPAddress] = Field(
        default=[],
        description=(
            "Reverse proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (the client "
            "address the login throttle counts); empty: none."
        ),
    )

    @model_validator(mode="after")
    def _one_source(self) -> "Console":
        if self.users is not None and self.accounts is not None:
            raise field_error("console_accounts", "set either users (a file) or accounts, not both",
                              loc_suffix=("accounts",))
        if self.accounts == "ldap" and self.ldap is None:
            raise field_error("console_accounts", "accounts: ldap needs a console.ldap section",
                              loc_suffix=("accounts",))
        return self

    @property
    def enabled(self) -> bool:
        return self.users is not None or self.accounts is not None


class Store(_Model):
    """The store for history, quarantine and release links: an SQLite file on one machine, or
    one PostgreSQL database that several proxies share (docs/operations.md, "The store")."""

    sqlite: ConfigPath | None = Field(
        default=None,
        description=(
            "SQLite database file (one machine); relative to the config file. Without a "
            "configuration file (the embedded default) it is `./smtpproxy.db`."
        ),
    )
    postgresql: str | None = Field(
        default=None,
        description=(
            "PostgreSQL connection string (`postgresql://user@host/db`) for a store the nodes "
            "share; a password belongs in ~/.pgpass or PGPASSFILE, not here."
        ),
    )
    node: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
        description="This proxy's name in records (which node kept a message); default: the host name.",
    )
    timeout: float = seconds(10, "Seconds one store operation may take before it counts as failed.")
    pool_size: int = Field(
        default=5, strict=True, ge=1, le=100, description="PostgreSQL connections per proxy process at most."
    )

    @model_validator(mode="after")
    def _one_backend(self) -> "Store":
        if self.sqlite is not None and self.postgresql is not None:
            raise PydanticCustomError("store", "set either sqlite or postgresql, not both")
        return self

    @property
    def configured(self) -> bool:
        return self.sqlite is not None or self.postgresql is not None


class PluginSpec(_Model):
    """One plugin in the filter chain; plugins run in the order listed."""

    name: str = Field(
        description="Unique name of this plugin instance (lower-case letters, digits, '_', '.', '-')."
    )
    use: str | None = Field(
        default=None,
        description=(
            "Entry point name in group 'smtpproxy.plugins' or 'package.module:Class'; defaults to name."
        ),
    )
    enabled: bool = Field(default=True, strict=True, description="Set to false to skip this plugin.")
    timeout: float = Field(
        default=10,
        strict=True,
        gt=0,
        allow_inf_nan=False,
        description="Seconds each hook call of this plugin may take.",
    )
    on_error: Literal["tempfail", "continue"] = Field(
        default="tempfail",
        description="When the plugin fails or times out: answer with a temporary failure, or skip it.",
    )
    enforce: bool = Field(
        default=True,
        strict=True,
        description=(
            "Set to false for shadow mode: the plugin runs, but its verdicts, edits and errors are "
            "only logged (would_reject, ...) and counted, never applied; its score counts apart "
            "(shadow_score)."
        ),
    )
    settings: dict[str, Any] = Field(
        default={}, description="Plugin-specific settings, validated by the plugin itself."
    )

    @field_validator("name")
    @classmethod
    def _name_valid(cls, value: str) -> str:
        if not PLUGIN_NAME.match(value):
            raise field_error(
                "plugin_name",
                f"must consist of lower-case letters, digits, '_', '.' and '-' (got {describe_value(value)})",
            )
        return value

    @field_validator("use")
    @classmethod
    def _use_valid(cls, value: str | None) -> str | None:
        if value is not None and not USE_SPEC.match(value):
            raise field_error(
                "plugin_use",
                f"must be an entry point name or 'package.module:Class' (got {describe_value(value)})",
            )
        return value


class DNS(_Model):
    """The resolver every plugin shares (SPF, DKIM, DMARC, DNSBL, reverse DNS)."""

    nameservers: list[IPAddress] | None = Field(
        default=None, description="Resolver addresses; default: those in /etc/resolv.conf."
    )
    port: int = Field(default=53, strict=True, ge=1, le=65535, description="Resolver port.")
    timeout: float = Field(
        default=5, strict=True, gt=0, allow_inf_nan=False,
        description="Seconds a lookup may take before it counts as a temporary error.",
    )
    cache_size: int = Field(
        default=10000, strict=True, ge=0, description="Answers cached (by their TTL); 0 turns the cache off."
    )


class Logging(_Model):
    """Log output."""

    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Least severe level that is logged."
    )
    format: Literal["kv", "json"] = Field(
        default="kv", description="Line format: 'kv' (key=value pairs) or 'json' (one object per line)."
    )
    accepted_commands: Literal["info", "debug"] = Field(
        default="info",
        description=(
            "Level of the lines of a session's steps that passed (connect, helo, starttls, "
            "mail_from, rcpt_to, upstream_rcpt, delivered, disconnect). 'debug' leaves a "
            "delivered message one line at info, its 'message' summary, with the plugins' own "
            "lines; refusals, deferrals and problems keep their level (docs/operations.md#logs)."
        ),
    )


def _check_clients(value: list[Any]) -> list[Any]:
    if not value:
        raise field_error("clients_empty", "must list at least one network: with none, no host could "
                          "connect (127.0.0.1/32 for this host alone)")
    return value


Clients = Annotated[list[Network], AfterValidator(_check_clients)]


def _clients(what: str, refused: str,
             unix: str = " Not used for a unix: socket (its permissions decide).") -> Any:
    """``clients:`` of a listener with no authentication of its own: only these hosts talk to it."""
    return Field(
        default_factory=lambda: list(LOOPBACK),
        description=(
            f"Networks whose hosts may connect to {what} over TCP (CIDR, no host bits); any other "
            f"host's connection is {refused} and logged. This host only by default, wherever it "
            f"listens: list the other hosts that should reach it.{unix}"
        ),
    )


class Metrics(_Model):
    """The HTTP endpoint for Prometheus metrics, /healthz and /readyz (see docs/operations.md)
    of each front end that runs with this file, each on a port of its own."""

    enabled: bool = Field(
        default=False, strict=True,
        description="Serve /metrics, /healthz and /readyz; needs prometheus-client (the [metrics] extra).",
    )
    address: IPAddress = Field(
        default="127.0.0.1", description="Address to serve on; keep it private (no authentication)."
    )
    port: int = Field(
        default=9125, strict=True, ge=0, le=65535,
        description="The proxy's TCP port (0: any free port); with `workers:`, each worker's is "
                    "port + its index.",
    )
    milter_port: int | None = Field(
        default=None, strict=True, ge=0, le=65535,
        description=(
            "Where `smtpproxy milter` serves the endpoint; none: it serves none. A port of its own, "
            "because the proxy, the milter and the policy service may read one file (the shipped "
            "units do), and two processes cannot listen on one port."
        ),
    )
    policy_port: int | None = Field(
        default=None, strict=True, ge=0, le=65535,
        description="Where `smtpproxy policy` serves the endpoint; none: it serves none (see milter_port).",
    )
    web_port: int | None = Field(
        default=None, strict=True, ge=0, le=65535,
        description=(
            "Where `smtpproxy web` serves the endpoint (its login throttle's events and the "
            "process); none: it serves none (see milter_port)."
        ),
    )
    clients: Clients = _clients("/metrics, /healthz and /readyz", "answered 403", unix="")
    ready_cache: float = Field(
        default=5, strict=True, gt=0, allow_inf_nan=False,
        description="Seconds a /readyz upstream probe is reused (so scrapers cannot hammer the upstream).",
    )
    ready_requires_delivery: bool = Field(
        default=False, strict=True,
        description=(
            "Make /readyz answer 503 while the delivery backend is unusable. Off: a proxy whose "
            "upstream is down stays in the balancer and answers 4xx, since the upstream is "
            "usually shared and draining every proxy would leave clients a closed connection. "
            "On when each proxy has an upstream of its own (docs/deploy-cluster.md)."
        ),
    )


def _check_milter_listen(value: str) -> str:
    try:
        parse_listen(value)
    except ValueError as exc:
        raise field_error("milter_listen", str(exc)) from None
    return value


class Milter(_Model):
    """Milter mode (`smtpproxy milter`): the plugin chain served to Postfix or Sendmail."""

    listen: Annotated[str, AfterValidator(_check_milter_listen)] = Field(
        default="inet:127.0.0.1:8890",
        description="Where the MTA connects: `inet:HOST:PORT` (`inet:[::1]:PORT`) or `unix:/PATH`.",
    )
    clients: Clients = _clients("the milter", "closed before its first packet")
    socket_mode: str = Field(
        default="0660", pattern=r"^0?[0-7]{3}$",
        description="Permissions of the Unix socket (octal); the MTA's user must be able to write it.",
    )
    default_action: Literal["tempfail", "accept", "reject"] = Field(
        default="tempfail",
        description=(
            "What a plugin error (exception, timeout) becomes: tempfail (451), reject (550) "
            "or accept (the message passes unfiltered), like Postfix's milter_default_action."
        ),
    )
    not_granted_action: Literal["default_action", "tempfail", "accept", "reject"] = Field(
        default="default_action",
        description=(
            "What a message becomes when the plugins changed it (headers, body, envelope) or "
            "quarantined it and the MTA did not grant that action at negotiation: "
            "default_action (as milter.default_action), tempfail (451), reject (550), or accept "
            "(the message passes without the change). Logged as milter_not_granted."
        ),
    )
    max_packet_size: int = Field(
        default=262144, strict=True, ge=65536, le=16777216,
        description="Largest packet accepted from the MTA (bytes); bigger ones close the connection.",
    )
    timeout: float = seconds(
        300, "Seconds to wait for the MTA's next command before closing the connection."
    )
    progress_interval: float = seconds(
        10, "While plugins work, tell the MTA every this many seconds that we are alive."
    )
    check_sender_login: bool = Field(
        default=False, strict=True,
        description=(
            "Hold the MAIL FROM and (with sender_login.headers) the From:/Sender: of sessions the "
            "MTA reports as authenticated ({auth_authen}) to the sender_login map, read at start "
            "(docs/submission.md): the header check Postfix's smtpd_sender_login_maps lacks."
        ),
    )


class Policy(_Model):
    """Policy mode (`smtpproxy policy`): the plugin chain as a Postfix access policy service."""

    listen: Annotated[str, AfterValidator(_check_milter_listen)] = Field(
        default="inet:127.0.0.1:10040",
        description="Where Postfix's check_policy_service connects: `inet:HOST:PORT` or `unix:/PATH`.",
    )
    clients: Clients = _clients("the policy service", "closed before its first request")
    socket_mode: str = Field(
        default="0660", pattern=r"^0?[0-7]{3}$",
        description="Permissions of the Unix socket (octal); Postfix's user must be able to write it.",
    )
    default_action: Literal["tempfail", "accept", "reject"] = Field(
        default="tempfail",
        description=(
            "What a plugin error (exception, timeout) becomes: tempfail (its 4xx), reject (550) "
            "or accept (DUNNO: the site's other restrictions decide)."
        ),
    )
    quarantine_action: Literal["tempfail", "reject", "hold", "dunno"] = Field(
        default="tempfail",
        description=(
            "What a plugin's quarantine verdict becomes (the policy service keeps no message): "
            "tempfail (451), reject (550), hold (Postfix's HOLD: its hold queue, released with "
            "postsuper -H; not smtpproxy's quarantine) or dunno (the message passes)."
        ),
    )
    message_plugins: Literal["refuse", "warn"] = Field(
        default="refuse",
        description=(
            "Plugins that decide on the header or body (their `data` hook) cannot run here: "
            "Postfix sends no message. refuse: check-config and `smtpproxy policy` stop and name "
            "a plugin that decides only on the message; warn: it is named and not run. A plugin "
            "with envelope hooks too (ratelimit, dnsbl) always runs those and is named in a warning."
        ),
    )
    max_instances: int = Field(
        default=10000, strict=True, ge=10, le=10_000_000,
        description=("Mail transactions (Postfix `instance`) remembered at once; "
                     "the oldest is forgotten first."),
    )
    instance_timeout: float = seconds(
        3600, "Seconds without a request after which a transaction's state is forgotten."
    )
    timeout: float = seconds(
        1000, "Seconds to wait for Postfix's next request before closing the connection "
        "(longer than smtpd_policy_service_max_idle)."
    )
    max_line: int = Field(
        default=4096, strict=True, ge=512, le=1_048_576,
        description="Longest `name=value` line (bytes); longer closes the connection.",
    )
    max_attributes: int = Field(
        default=100, strict=True, ge=40, le=10000,
        description="Most attribute lines in one request; more closes the connection.",
    )
    max_request: int = Field(
        default=65536, strict=True, ge=4096, le=16_777_216,
        description="Most bytes in one request; more closes the connection.",
    )


class Config(_Model):
    """The complete smtpproxy configuration."""

    listeners: list[Listener] = Field(
        default=[Listener()], min_length=1, description="Addresses and ports to accept SMTP on."
    )
    limits: Limits = Field(default=Limits(), description="Resource limits.")
    smtp: SmtpPolicy = Field(default=SmtpPolicy(), description="SMTP protocol behaviour.")
    relay: Relay = Field(default=Relay(), description="Accepted recipient domains and relay clients.")
    delivery: MaildirDeliveryConfig | SmtpDeliveryConfig = Field(
        default=MaildirDeliveryConfig(),
        discriminator="type",
        description="Where accepted mail goes: a local Maildir or another SMTP server.",
    )
    quarantine: Quarantine = Field(default=Quarantine(), description="Quarantine storage.")
    store: Store = Field(default=Store(), description="History and quarantine database (optional).")
    history: History = Field(default=History(), description="Message history (with a `store`).")
    digest: Digest = Field(default=Digest(), description="Quarantine digests and release links.")
    console: Console = Field(default=Console(), description="The web console (in `smtpproxy web`).")
    plugins: list[PluginSpec] = Field(
        default=[], description="Filter plugins, called in this order for every message."
    )
    policies: list[PolicyGroup] = Field(
        default=[],
        description=(
            "Policy groups (docs/multi-domain.md): per recipient, the first group whose selectors "
            "match changes plugins and quarantine retention; other recipients get the global "
            "configuration (the 'default' group)."
        ),
    )
    plugin_paths: list[ExistingDirectory] = Field(
        default=[],
        description=(
            "Directories (relative to this file) searched first for the modules that "
            "'use: module:Class' names, for plugins that are not installed as packages."
        ),
    )
    dns: DNS = Field(default=DNS(), description="DNS resolver settings shared by all plugins.")
    milter: Milter = Field(default=Milter(), description="Milter mode (`smtpproxy milter`).")
    policy: Policy = Field(default=Policy(), description="Policy mode (`smtpproxy policy`).")
    logging: Logging = Field(default=Logging(), description="Log level and format.")
    workers: Annotated[int, Field(strict=True, ge=1, le=MAX_WORKERS)] | Literal["auto"] = Field(
        default=1,
        description=(
            "Proxy processes accepting from each listening socket (opened once by a supervisor): "
            f"a number, or 'auto' for one per core this process may run on (at most {MAX_WORKERS}). "
            "More than one (and 'auto' always) needs a fixed port on every listener; each worker "
            "has its own metrics port (metrics.port + worker index)."
        ),
    )
    event_loop: Literal["auto", "asyncio", "uvloop"] = Field(
        default="auto",
        description=(
            "The asyncio event loop: 'uvloop' (faster; installed with smtpproxy on CPython on "
            "Linux and macOS), 'asyncio' (the standard one), or 'auto' (uvloop when it can be "
            "imported, else asyncio's)."
        ),
    )
    metrics: Metrics = Field(default=Metrics(), description="Metrics and health endpoints.")
    login_throttle: LoginThrottle = Field(
        default=LoginThrottle(), description="Brakes on password guessing at SMTP AUTH."
    )
    sender_login: SenderLogin | None = Field(
        default=None, description="Which logins may use which sender addresses (submission listeners)."
    )
    tables: dict[str, TableConfig] = Field(
        default={},
        description=(
            "Named lookup tables (docs/tables.md) that features and plugins use by name: "
            "inline, file, regexp, redis, sqlite, postgresql or ldap."
        ),
    )
    pid_file: ConfigPath | None = Field(
        default=None,
        description="Write the process id here while running; `smtpproxy reload` signals it.",
    )
    hostname: HeloName | None = Field(
        default=None,
        description=(
            "This host's name for the banner, EHLO and Received headers; "
            "defaults to the machine's host name (set it to the public FQDN)."
        ),
    )
    received_header: Literal["auto", "always", "never"] = Field(
        default="auto",
        description=(
            "Write the proxy's own Received: trace field (RFC 5321 4.4: client HELO, name and "
            "address, TLS, transaction id) when a message leaves: 'auto' when the next hop is "
            "not told the client (no XCLIENT/XFORWARD, e.g. client_identity: none, or Maildir), "
            "'always', or 'never'. Added at delivery, so plugins do not see it."
        ),
    )

    @model_validator(mode="after")
    def _milter_sender_login_needs_a_map(self) -> "Config":
        if self.milter.check_sender_login and self.sender_login is None:
            raise field_error(
                "sender_login_missing",
                "needs a sender_login section (map or file)",
                loc_suffix=("milter", "check_sender_login"),
            )
        return self

    @field_validator("tables")
    @classmethod
    def _table_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not re.fullmatch(TABLE_NAME, name):
                raise field_error("table_name", f"table name {name!r}: use a-z, 0-9, '_', '.', '-'",
                                  loc_suffix=(name,))
        return value

    @model_validator(mode="after")
    def _console_table_exists(self) -> "Config":
        source = self.console.accounts or ""
        if source.startswith("table:") and source[6:] not in self.tables:
            known = ", ".join(sorted(self.tables)) or "none are defined"
            raise field_error("table_unknown", f"no table named {source[6:]!r} in tables ({known})",
                              loc_suffix=("console", "accounts"))
        return self

    @model_validator(mode="after")
    def _sender_login_table_exists(self) -> "Config":
        wanted = self.sender_login.table if self.sender_login is not None else None
        if wanted is not None and wanted not in self.tables:
            known = ", ".join(sorted(self.tables)) or "none are defined"
            raise field_error("table_unknown", f"no table named {wanted!r} in tables ({known})",
                              loc_suffix=("sender_login", "table"))
        return self

    @model_validator(mode="after")
    def _policies_consistent(self) -> "Config":
        try:
            routes = self.delivery.route_names if isinstance(self.delivery, SmtpDeliveryConfig) else None
            check_policies(self.policies, {p.name for p in self.plugins}, set(self.tables), routes)
        except PydanticCustomError as exc:
            context = dict(exc.context or {})
            context["loc_suffix"] = ("policies", *context.get("loc_suffix", ()))
            raise PydanticCustomError(exc.type, exc.message_template, context) from None
        return self

    @field_validator("listeners")
    @classmethod
    def _listeners_unique(cls, value: list[Listener]) -> list[Listener]:
        seen: dict[tuple[str, int], int] = {}
        for index, listener in enumerate(value):
            if listener.port == 0:
                continue  # each port-0 listener gets its own free port
            first = seen.setdefault((listener.address, listener.port), index)
            if first != index:
                raise field_error(
                    "duplicate_listener",
                    f"{listener.address} port {listener.port} is already used by listeners[{first}]",
                    loc_suffix=(index, "port"),
                )
        return value

    @property
    def worker_count(self) -> int:
        """How many proxy processes ``workers`` asks for here ('auto': the usable cores)."""
        if self.workers == "auto":
            return cpu_count()
        return self.workers

    @field_validator("workers")
    @classmethod
    def _workers_need_fixed_ports(
        cls, value: int | Literal["auto"], info: ValidationInfo
    ) -> int | Literal["auto"]:
        if value == "auto" or value > 1:
            for index, listener in enumerate(info.data.get("listeners") or []):
                if listener.port == 0:
                    raise field_error(
                        "workers_need_fixed_ports",
                        f"workers: {value} needs a fixed port on every listener, but "
                        f"listeners[{index}] has port 0 (each worker would pick its own free port)",
                    )
        return value

    @field_validator("plugins")
    @classmethod
    def _plugin_names_unique(cls, value: list[PluginSpec]) -> list[PluginSpec]:
        seen: dict[str, int] = {}
        for index, plugin in enumerate(value):
            first = seen.setdefault(plugin.name, index)
            if first != index:
                raise field_error(
                    "duplicate_plugin",
                    f"plugin name {plugin.name!r} is already used by plugins[{first}]",
                    loc_suffix=(index, "name"),
                )
        return value
