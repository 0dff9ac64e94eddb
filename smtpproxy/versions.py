"""The versions smtpproxy promises, and the check that a plugin gets the API it was built for.

Three version numbers, each with its own promise (docs/compatibility.md):

- the package version, :data:`__version__` (semantic versioning; what a plugin package pins
  as its dependency). This is the one place it is written: ``smtpproxy.__version__``,
  pyproject.toml (``dynamic``, read from this file without importing it), the wheel's
  metadata, ``smtpproxy --version`` and the ``smtpproxy_info`` metric all take it from here;
- :data:`PLUGIN_API_VERSION`, ``MAJOR.MINOR``, of what ``smtpproxy`` exports to plugins and
  the hooks it calls: a minor release adds to it, only a major one removes or changes;
- :data:`LOG_FORMAT_VERSION`, ``MAJOR.MINOR``, of the log lines (their fields, events and
  escaping), which log pipelines and fail2ban filters parse.

A plugin class (or module) may declare ``requires_plugin_api = "1.2"``: it is then loaded only
by an smtpproxy whose plugin API has the same major version and at least that minor one, and
refused at load time, by ``check-config`` too, with a message naming both versions.
"""

from __future__ import annotations

import re

__all__ = ["LOG_FORMAT_VERSION", "PLUGIN_API_VERSION", "PluginAPIError", "__version__", "check_plugin_api"]

__version__ = "0.1.0"
"""The package version (``MAJOR.MINOR.PATCH``)."""

PLUGIN_API_VERSION = "1.0"
"""The plugin API this smtpproxy provides (``MAJOR.MINOR``)."""

LOG_FORMAT_VERSION = "1.0"
"""The format of the log lines (``MAJOR.MINOR``); the ``listening`` line carries it."""

_API = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)")


class PluginAPIError(Exception):
    """A plugin requires a plugin API this smtpproxy does not provide, or says so wrongly."""


def _parse(version: str) -> tuple[int, int]:
    match = _API.fullmatch(version)
    if match is None:
        raise ValueError(f"not a MAJOR.MINOR version: {version!r}")
    return int(match.group(1)), int(match.group(2))


def check_plugin_api(target: object, name: str) -> None:
    """Raise :class:`PluginAPIError` unless ``target``'s ``requires_plugin_api`` (if any) is
    met by :data:`PLUGIN_API_VERSION`. ``name`` is how the configuration names the plugin."""
    required = getattr(target, "requires_plugin_api", None)
    if required is None:
        return
    where = _describe(target)
    if not isinstance(required, str):
        raise PluginAPIError(f"plugin {name!r} ({where}): requires_plugin_api must be a string like "
                             f"'1.0', not {required!r}")
    try:
        want = _parse(required)
    except ValueError:
        raise PluginAPIError(f"plugin {name!r} ({where}): requires_plugin_api must be MAJOR.MINOR "
                             f"like '1.0', not {required!r}") from None
    have = _parse(PLUGIN_API_VERSION)
    if want[0] != have[0] or want[1] > have[1]:
        raise PluginAPIError(
            f"plugin {name!r} ({where}) requires plugin API {required}; smtpproxy {__version__} "
            f"provides plugin API {PLUGIN_API_VERSION} (install a version of the plugin made for "
            f"API {have[0]}.x, or an smtpproxy that provides {required})"
        )


def _describe(target: object) -> str:
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", None)
    if module and qualname:
        return f"{module}:{qualname}"
    return getattr(target, "__name__", type(target).__name__)
