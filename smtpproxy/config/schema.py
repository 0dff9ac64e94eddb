"""The configuration schema: every section and key, its default and its description.

docs/configuration.md is generated from these models (docs/gen_configuration.py).
"""

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from smtpproxy.config.fields import (
    PLUGIN_NAME,
    USE_SPEC,
    ConfigPath,
    ExistingDirectory,
    ExistingFile,
    HeloName,
    Host,
    IPAddress,
    Network,
    RelayDomain,
    field_error,
    seconds,
)
from smtpproxy.config.problems import describe_value

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


class _Model(BaseModel):
    """Base of all configuration sections: unknown keys are errors, instances are immutable,
    and a key whose value is null/empty means "use the default"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(
            value is None and key in cls.model_fields for key, value in data.items()
        ):
            return {
                key: value for key, value in data.items() if not (value is None and key in cls.model_fields)
            }
        return data


class ListenerTLS(_Model):
    """TLS material for STARTTLS (or implicit TLS) on a listener."""

    cert: ExistingFile = Field(
        description="PEM file with the server certificate chain; relative to the config file."
    )
    key: ExistingFile = Field(
        description="PEM file with the private key for the certificate; relative to the config file."
    )
    min_version: Literal["TLSv1.2", "TLSv1.3"] = Field(
        default="TLSv1.2", description="Oldest TLS protocol version clients may negotiate."
    )


class ListenerAuth(_Model):
    """SMTP AUTH (PLAIN and LOGIN) on a submission listener; offered only over TLS."""

    users_file: ExistingFile = Field(
        description=(
            "File of 'user:hash' lines (bcrypt '$2b$...' or Argon2 '$argon2id$...'; '#' starts a "
            "comment line), read at startup; relative to the config file."
        )
    )
    require: bool = Field(
        default=True,
        strict=True,
        description="Refuse MAIL FROM with 530 5.7.0 until the client has authenticated.",
    )
    check_sender_login: bool = Field(
        default=True,
        strict=True,
        description=(
            "Hold MAIL FROM (and with sender_login.headers, From:/Sender:) to the sender_login "
            "map on this listener, when that section is set (docs/submission.md)."
        ),
    )

    @field_validator("users_file")
    @classmethod
    def _users_file_loads(cls, value: Path, info: ValidationInfo) -> Path:
        from smtpproxy.auth import PasswordFile, PasswordFileError

        base = info.context.get("base_dir") if isinstance(info.context, dict) else None
        target = value if value.is_absolute() or base is None else Path(base) / value
        try:
            PasswordFile.load(target)
        except PasswordFileError as exc:
            raise field_error("users_file", str(exc)) from None
        return target


class LoginThrottle(_Model):
    """Brakes on password guessing at SMTP AUTH (docs/submission.md): a growing delay per
    address and per login, a lockout per address, shared through Redis when set."""

    enabled: bool = Field(default=True, strict=True, description="Throttle failed logins.")
    initial_delay: float = Field(
        default=2, strict=True, ge=0, le=60, allow_inf_nan=False,
        description=(
            "Seconds a login waits (before its password is checked) after one failure of its "
            "address or login; doubles with each further failure (0: no delays)."
        ),
    )
    max_delay: float = Field(
        default=15, strict=True, ge=0, le=300, allow_inf_nan=False,
        description="The longest such wait (Dovecot's cap is 15 s).",
    )
    lockout_after: int = Field(
        default=10, strict=True, ge=1,
        description="Failures from one address (network, see ipv6_prefix) that lock it out.",
    )
    lockout_seconds: float = Field(
        default=900, strict=True, gt=0, allow_inf_nan=False,
        description="How long a locked-out address gets 421 4.7.0 at AUTH.",
    )
    forget_after: float = Field(
        default=900, strict=True, gt=0, allow_inf_nan=False,
        description="Seconds without a new failure after which an address's or login's count starts over.",
    )
    ipv4_prefix: int = Field(
        default=32, strict=True, ge=8, le=32, description="IPv4 clients are counted per network of this size."
    )
    ipv6_prefix: int = Field(
        default=64, strict=True, ge=16, le=128,
        description="IPv6 clients are counted per network of this size (a /64 is one subscriber).",
    )
    spraying_logins: int = Field(
        default=5, strict=True, ge=2,
        description="Distinct logins failed from one address (within forget_after) that log auth_spraying.",
    )
    trusted_networks: list[Network] = Field(
        default=[], description="Client networks never delayed, counted or locked out."
    )
    redis_url: str | None = Field(
        default=None,
        description=(
            "Share the counts through this Redis (redis://host:port/db) so that proxies behind a "
            "balancer count together; while it does not answer, each proxy counts alone."
        ),
    )
    redis_timeout: float = Field(
        default=0.5, strict=True, gt=0, allow_inf_nan=False,
        description="Seconds a Redis call may take before this process's counts are used.",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_usable(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise field_error("redis_url", "must be a redis://, rediss:// or unix:// URL")
        try:
            import redis.asyncio  # noqa: F401 - only whether it is installed
        except ImportError:
            raise field_error(
                "redis_missing", "needs the redis package: pip install 'smtpproxy[redis]'"
            ) from None
        return value


class SenderLogin(_Model):
    """Which logins own which sender addresses (Postfix's smtpd_sender_login_maps with
    reject_sender_login_mismatch), enforced on listeners with auth (docs/submission.md)."""

    map: dict[str, list[str] | str] = Field(
        default={},
        description=(
            "Sender ('user@domain', '@domain' or '/regex/') to the logins that own it "
            "(a list, or one string of logins separated by commas)."
        ),
    )
    file: ExistingFile | None = Field(
        default=None,
        description=(
            "A map file of 'sender  login, login' lines, searched with map; re-read at reload "
            "(SIGHUP); relative to the config file."
        ),
    )
    recipient_delimiter: str = Field(
        default="+", max_length=8,
        description=(
            "Characters that start an address extension (user+tag@ is looked up as user@ too); "
            "'' for none."
        ),
    )
    unknown_senders: Literal["reject", "allow"] = Field(
        default="reject",
        description=(
            "An authenticated client using a sender not in the map: refused (Postfix's "
            "reject_sender_login_mismatch) or allowed (reject_known_sender_login_mismatch)."
        ),
    )
    headers: bool = Field(
        default=False, strict=True,
        description=(
            "Hold every From: and Sender: address, and an address shown in their display names, "
            "to the map too (550 5.7.1 at the end of DATA)."
        ),
    )

    @field_validator("map")
    @classmethod
    def _map_valid(cls, value: dict[str, list[str] | str]) -> dict[str, list[str] | str]:
        from smtpproxy.senderlogin import SenderLoginMapError, StaticTable

        try:
            StaticTable.build((k, v, f"map[{k!r}]") for k, v in value.items())
        except SenderLoginMapError as exc:
            raise field_error("sender_login_map", str(exc)) from None
        return value

    @field_validator("file")
    @classmethod
    def _file_loads(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        from smtpproxy.senderlogin import SenderLoginMapError, StaticTable

        if value is None:
            return None
        base = info.context.get("base_dir") if isinstance(info.context, dict) else None
        target = value if value.is_absolute() or base is None else Path(base) / value
        try:
            StaticTable.load(target)
        except SenderLoginMapError as exc:
            raise field_error("sender_login_file", str(exc)) from None
        return target

    @model_validator(mode="after")
    def _not_empty(self) -> "SenderLogin":
        if not self.map and self.file is None:
            raise field_error("sender_login_empty", "needs 'map' or 'file' (or both)")
        return self


class Listener(_Model):
    """An address and port on which the proxy accepts SMTP connections."""

    address: IPAddress = Field(
        default="127.0.0.1",
        description="IP address to listen on; '0.0.0.0' or '::' for all addresses (no host names).",
    )
    port: int = Field(
        default=2525, strict=True, ge=0, le=65535,
        description="TCP port to listen on; 0 picks a free port (the log line 'listening' tells which).",
    )
    banner: str = Field(
        default="ESMTP smtpproxy",
        max_length=400,
        description="Text after the host name in the 220 greeting (printable ASCII).",
    )
    tls: ListenerTLS | None = Field(
        default=None,
        description="Certificate and key; when set, STARTTLS is offered (or TLS is implicit: implicit_tls).",
    )
    require_starttls: bool = Field(
        default=False,
        strict=True,
        description="Refuse mail transactions until the client has issued STARTTLS (needs tls).",
    )
    implicit_tls: bool = Field(
        default=False,
        strict=True,
        description="Speak TLS from the first byte (port 465 style; needs tls); STARTTLS is not offered.",
    )
    proxy_protocol: bool = Field(
        default=False,
        strict=True,
        description=(
            "Expect a PROXY protocol v1/v2 header (HAProxy, load balancers) before SMTP and treat "
            "the client it names as the real client."
        ),
    )
    proxy_protocol_from: list[Network] = Field(
        default=[],
        description=(
            "Networks of the proxies allowed to send a PROXY header (required with proxy_protocol); "
            "other peers are disconnected without a banner."
        ),
    )
    proxy_protocol_timeout: float = seconds(
        5, "Seconds the PROXY header may take to arrive before the connection is closed."
    )
    auth: ListenerAuth | None = Field(
        default=None,
        description="SMTP AUTH for a submission listener (port 587/465 style); needs tls.",
    )

    @field_validator("banner")
    @classmethod
    def _banner_is_printable(cls, value: str) -> str:
        if not all(" " <= char <= "~" for char in value):
            raise field_error(
                "banner",
                "must be printable ASCII text without control characters or line breaks",
            )
        return value

    @field_validator("require_starttls")
    @classmethod
    def _starttls_needs_tls(cls, value: bool, info: ValidationInfo) -> bool:
        if value and "tls" in info.data and info.data["tls"] is None:
            raise field_error(
                "starttls_without_tls",
                "require_starttls needs a 'tls' section (cert and key) on this listener",
            )
        return value

    @field_validator("implicit_tls")
    @classmethod
    def _implicit_tls_needs_tls(cls, value: bool, info: ValidationInfo) -> bool:
        if value and "tls" in info.data and info.data["tls"] is None:
            raise field_error(
                "implicit_tls_without_tls",
                "implicit_tls needs a 'tls' section (cert and key) on this listener",
            )
        if value and info.data.get("require_starttls"):
            raise field_error(
                "implicit_tls_with_starttls",
                "implicit_tls and require_starttls exclude each other: with implicit_tls every "
                "connection is encrypted from the start",
            )
        return value

    @field_validator("auth")
    @classmethod
    def _auth_needs_tls(cls, value: ListenerAuth | None, info: ValidationInfo) -> ListenerAuth | None:
        if value is not None and "tls" in info.data and info.data["tls"] is None:
            raise field_error(
                "auth_without_tls",
                "auth needs a 'tls' section (cert and key) on this listener: "
                "AUTH is only offered over TLS",
            )
        return value

    @model_validator(mode="after")
    def _proxy_protocol_consistent(self) -> "Listener":
        if self.proxy_protocol and not self.proxy_protocol_from:
            raise field_error(
                "proxy_protocol_from_missing",
                "proxy_protocol needs proxy_protocol_from: the networks of the proxies allowed "
                "to send a PROXY header (e.g. ['10.0.0.5/32'])",
                loc_suffix=("proxy_protocol_from",),
            )
        if self.proxy_protocol and self.implicit_tls:
            raise field_error(
                "proxy_protocol_with_implicit_tls",
                "proxy_protocol cannot be combined with implicit_tls (the PROXY header comes before "
                "the TLS handshake); use STARTTLS on this listener or terminate TLS at the proxy",
                loc_suffix=("proxy_protocol",),
            )
        return self


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

    domains: list[RelayDomain] = Field(
        min_length=1, description="Recipient domains ('example.com' or '*.example.com') for this route."
    )
    upstreams: list[Upstream] = Field(min_length=1, description="The servers for this route.")


class UpstreamAuth(_Model):
    """Credentials for a smarthost that requires SMTP AUTH (sent only over TLS)."""

    username: str = Field(min_length=1, description="User name; use ${ENV_VAR} to keep it out of the file.")
    password: str = Field(min_length=1, description="Password; use ${ENV_VAR} to keep it out of the file.")


class UpstreamPool(_Model):
    """Reuse of idle upstream connections."""

    max_idle: int = Field(
        default=32, strict=True, ge=0,
        description=(
            "Idle connections kept per server; 0 turns reuse off. Enough for the deliveries in "
            "flight at 100 concurrent sessions: fewer would close and reopen connections per "
            "message (bench/README.md: 25 % more CPU per message at concurrency 100 with 4)."
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
            "mode, where DATA waits for the client). 'false' sends one command at a time "
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
    """The web console in `smtpproxy web` (docs/console.md): on when `users` is set."""

    users: ExistingFile | None = Field(
        default=None,
        description=(
            "Accounts file, one `name:hash:role[:domains]` line each (bcrypt or Argon2 hash as for "
            "SMTP AUTH; role `admin`, `domain` with comma-separated domains, or `recipient` whose "
            "name is the address); relative to the config file."
        ),
    )
    secure_cookie: bool = Field(
        default=True,
        description="Send the session cookie over HTTPS only (false only to try it on plain HTTP).",
    )
    session_hours: float = Field(
        default=8, strict=False, gt=0, le=720, allow_inf_nan=False,
        description="Hours a console sign-in lasts.",
    )
    proxies: list[IPAddress] = Field(
        default=[],
        description=(
            "Reverse proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (the client "
            "address the login throttle counts); empty: none."
        ),
    )


class Store(_Model):
    """The store for history, quarantine and release links: an SQLite file on one machine, or
    one PostgreSQL database that several proxies share (docs/operations.md, "The store")."""

    sqlite: ConfigPath | None = Field(
        default=None, description="SQLite database file (one machine); relative to the config file."
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


class Metrics(_Model):
    """The HTTP endpoint for Prometheus metrics, /healthz and /readyz (see docs/operations.md)."""

    enabled: bool = Field(
        default=False, strict=True,
        description="Serve /metrics, /healthz and /readyz; needs prometheus-client (the [metrics] extra).",
    )
    address: IPAddress = Field(
        default="127.0.0.1", description="Address to serve on; keep it private (no authentication)."
    )
    port: int = Field(default=9125, strict=True, ge=0, le=65535, description="TCP port (0: any free port).")
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
    from smtpproxy.milter.endpoint import parse_listen  # the one parser, shared with the server

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
    plugin_paths: list[ExistingDirectory] = Field(
        default=[],
        description=(
            "Directories (relative to this file) searched first for the modules that "
            "'use: module:Class' names, for plugins that are not installed as packages."
        ),
    )
    dns: DNS = Field(default=DNS(), description="DNS resolver settings shared by all plugins.")
    milter: Milter = Field(default=Milter(), description="Milter mode (`smtpproxy milter`).")
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
