"""Validated field types for configuration and plugin settings.

``Network``, ``Host``, ``HeloName``, ``IPAddress``, ``RelayDomain``, ``ConfigPath``,
``ExistingFile`` and ``ExistingDirectory`` are public: a plugin's ``Settings`` model uses
them to check its own settings the way the core checks its own, with the same located
errors. Relative paths resolve against the configuration file's directory.
"""

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PlainValidator,
    ValidationInfo,
)
from pydantic_core import PydanticCustomError

from smtpproxy.config.problems import PathElement, describe_value

# --------------------------------------------------------------------------- validators


def field_error(kind: str, message: str, *, loc_suffix: tuple[PathElement, ...] = ()) -> PydanticCustomError:
    """A validation error with a fixed message (no "(got ...)" appended)."""
    context: dict[str, Any] = {"message": message, "show_input": False}
    if loc_suffix:
        context["loc_suffix"] = loc_suffix
    return PydanticCustomError(kind, "{message}", context)


_LABEL_TEXT = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_LABEL = re.compile(_LABEL_TEXT + r"\Z")
DOMAIN_NAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL_TEXT}(?:\.{_LABEL_TEXT})*\Z")
"""A domain name as the console takes one (a domain admin's domains, a list's key or entry):
lower-case ASCII labels, no trailing dot."""


def _normalize_hostname(name: str) -> str | None:
    """Lower-case ASCII (IDNA) form of a DNS name, or None if it is not one."""
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if not name or len(name) > 253:
        return None
    if all(_LABEL.match(label) for label in name.split(".")):
        return name
    return None


def _check_ip_address(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise field_error(
            "ip_address",
            f"must be an IP address such as '127.0.0.1', '0.0.0.0' or '::' "
            f"(host names are not allowed; got {describe_value(value)})",
        ) from None


def _check_host(value: str) -> str:
    """A host to connect to or verify: DNS name or IP address."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if _normalize_hostname(value) is None:
            raise field_error(
                "host",
                "must be a host name such as 'mx.example.com' or an IP address "
                f"(got {describe_value(value)})",
            ) from None
    return value


def _check_helo_name(value: str) -> str:
    """A name for EHLO/HELO and banners: DNS name or address literal like '[192.0.2.1]'."""
    if value.startswith("[") and value.endswith("]"):
        inner = value[1:-1]
        inner = inner[5:] if inner.lower().startswith("ipv6:") else inner
        try:
            ipaddress.ip_address(inner)
        except ValueError:
            pass
        else:
            return value
    elif _normalize_hostname(value) is not None:
        return value
    raise field_error(
        "hostname",
        f"must be a host name such as 'mail.example.com' or an address literal such as "
        f"'[192.0.2.1]' (got {describe_value(value)})",
    )


def _check_relay_domain(value: str) -> str:
    wildcard = value.startswith("*.")
    normalized = _normalize_hostname(value[2:] if wildcard else value)
    if normalized is None:
        raise field_error(
            "relay_domain",
            f"must be a domain such as 'example.com' or a wildcard such as '*.example.com' "
            f"(got {describe_value(value)})",
        )
    return f"*.{normalized}" if wildcard else normalized


def _parse_network(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    usage = "must be a network such as '192.0.2.0/24', '2001:db8::/32' or a single address"
    if not isinstance(value, str):
        raise field_error("network", f"{usage} (got {describe_value(value)})")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise field_error("network", f"{usage} (got {describe_value(value)})") from None
    if loose.prefixlen == loose.max_prefixlen:  # e.g. '10.0.0.1/32' cannot have host bits
        raise field_error("network", f"{usage} (got {describe_value(value)})")
    raise field_error(
        "network_host_bits",
        f"{value!r} has host bits set; did you mean {str(loose)!r}?",
    )


def _check_path_input(value: object) -> object:
    if not isinstance(value, str | os.PathLike):
        raise field_error("path", f"must be a path written as a string (got {describe_value(value)})")
    if isinstance(value, str):
        if not value:
            raise field_error("path", "must not be empty")
        if "\0" in value:
            raise field_error("path", "must not contain NUL characters")
    return value


def in_base_dir(value: Path, info: ValidationInfo) -> Path:
    """A configured path as written, or relative to the config file's directory
    (``context['base_dir']``, where the loader gives one)."""
    base = info.context.get("base_dir") if isinstance(info.context, dict) else None
    return value if value.is_absolute() or base is None else Path(base) / value


def _check_file(value: Path, info: ValidationInfo) -> Path:
    """The file must exist; relative paths are checked against context['base_dir']."""
    target = in_base_dir(value, info).absolute()
    if not target.is_file():
        what = "not a regular file" if target.exists() else "file not found"
        raise field_error("file_not_found", f"{what}: {target}")
    if not os.access(target, os.R_OK):
        raise field_error("file_not_readable", f"file not readable: {target}")
    return value


USE_SPEC = re.compile(
    r"(?:[A-Za-z0-9_.-]+|[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\Z"
)
PLUGIN_NAME = re.compile(r"[a-z0-9_.-]+\Z")

def _check_directory(value: Path, info: ValidationInfo) -> Path:
    """The directory must exist; relative paths are checked against context['base_dir']."""
    target = in_base_dir(value, info).absolute()
    if not target.is_dir():
        what = "not a directory" if target.exists() else "directory not found"
        raise field_error("directory_not_found", f"{what}: {target}")
    return value


ConfigPath = Annotated[Path, BeforeValidator(_check_path_input)]
ExistingDirectory = Annotated[Path, BeforeValidator(_check_path_input), AfterValidator(_check_directory)]
ExistingFile = Annotated[Path, BeforeValidator(_check_path_input), AfterValidator(_check_file)]
IPAddress = Annotated[str, AfterValidator(_check_ip_address)]
Host = Annotated[str, AfterValidator(_check_host)]
HeloName = Annotated[str, AfterValidator(_check_helo_name)]
Network = Annotated[
    ipaddress.IPv4Network | ipaddress.IPv6Network,
    PlainValidator(_parse_network, json_schema_input_type=str),
]
RelayDomain = Annotated[str, AfterValidator(_check_relay_domain)]


def seconds(default: float, description: str) -> Any:
    return Field(default=default, strict=True, gt=0, allow_inf_nan=False, description=description)
