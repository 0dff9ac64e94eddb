"""The ``listeners`` sections: address, TLS, AUTH, the login throttle and the sender/login map.

Part of the schema (:mod:`smtpproxy.config.schema` assembles it); docs/configuration.md is
generated from these models.
"""

from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from smtpproxy.config.fields import (
    ExistingFile,
    IPAddress,
    Network,
    field_error,
    in_base_dir,
    seconds,
)
from smtpproxy.config.section import Section as _Model


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

        target = in_base_dir(value, info)
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
    table: str | None = Field(
        default=None,
        description=(
            "Instead of map and file: the name of a lookup table (tables:) whose values for "
            "'user@domain' and '@domain' are the logins (a value may list several, separated by "
            "commas or spaces); a table that cannot answer makes MAIL FROM a 451 4.3.0."
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
        target = in_base_dir(value, info)
        try:
            StaticTable.load(target)
        except SenderLoginMapError as exc:
            raise field_error("sender_login_file", str(exc)) from None
        return target

    @model_validator(mode="after")
    def _not_empty(self) -> "SenderLogin":
        if self.table is not None and (self.map or self.file is not None):
            raise field_error("sender_login_table", "'table' replaces 'map' and 'file': use one or the other",
                              loc_suffix=("table",))
        if not self.map and self.file is None and self.table is None:
            raise field_error("sender_login_empty", "needs 'map' or 'file' (or both), or 'table'")
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
