"""Configuration: the YAML schema, loading, and error reporting with file/line/key.

Every problem with a configuration file is reported as a :class:`ConfigError` whose
string form is one line per problem::

    config/smtpproxy.yaml:14:5: limits.max_sessions: Input should be a valid integer (got 'lots')

Loading rules (see :func:`load_config`):

* YAML is parsed with a :class:`yaml.SafeLoader` subclass that records the position of
  every mapping key and sequence item and reports duplicate keys.
* Environment variables are interpolated in string *values* (not keys):
  ``${NAME}``, ``${NAME:-default}`` (default used when NAME is unset or empty) and
  ``$$`` for a literal ``$``.  A ``$`` followed by anything else is literal, but a ``${``
  that does not form a valid reference is an error.  An *unquoted* value is typed after
  interpolation exactly as if its text had been written in the file, so
  ``port: ${SMTP_PORT}`` yields an integer; a quoted value always stays a string.
* A key whose value is empty/``null`` means "use the default" (so a section whose
  entries are all commented out is fine).
* Relative paths are resolved against the configuration file's directory (or the
  current directory for the embedded default).

The package is split along those seams: :mod:`.problems` (ConfigError and its located
lines), :mod:`.source` (YAML with positions, environment interpolation, suggestions),
:mod:`.fields` (validated field types, public for plugin settings), :mod:`.schema` (the
sections and keys, with :mod:`.listeners` and :mod:`.delivery` for the two biggest, on
:mod:`.section`'s base) and :mod:`.loading` (:func:`load_config`).
"""

from smtpproxy.config.delivery import (
    MaildirDeliveryConfig,
    Route,
    SmtpDeliveryConfig,
    Upstream,
    UpstreamAuth,
    UpstreamPool,
)
from smtpproxy.config.fields import (
    ConfigPath,
    ExistingDirectory,
    ExistingFile,
    HeloName,
    Host,
    IPAddress,
    Network,
    RelayDomain,
)
from smtpproxy.config.listeners import Listener, ListenerAuth, ListenerTLS, LoginThrottle, SenderLogin
from smtpproxy.config.loading import load_config
from smtpproxy.config.problems import ConfigError, PathElement, Problem, format_key
from smtpproxy.config.schema import (
    DNS,
    EMBEDDED_STORE,
    MAX_WORKERS,
    Config,
    Limits,
    Logging,
    Metrics,
    Milter,
    PluginSpec,
    Policy,
    Quarantine,
    Relay,
    SmtpPolicy,
    cpu_count,
)
from smtpproxy.config.source import ConfigSource

__all__ = [
    "DNS",
    "EMBEDDED_STORE",
    "MAX_WORKERS",
    "Config",
    "ConfigError",
    "ConfigPath",
    "ConfigSource",
    "ExistingDirectory",
    "ExistingFile",
    "HeloName",
    "Host",
    "IPAddress",
    "Limits",
    "Listener",
    "ListenerAuth",
    "ListenerTLS",
    "Logging",
    "LoginThrottle",
    "MaildirDeliveryConfig",
    "Metrics",
    "Milter",
    "Network",
    "PathElement",
    "PluginSpec",
    "Policy",
    "Problem",
    "Quarantine",
    "Relay",
    "RelayDomain",
    "Route",
    "SenderLogin",
    "SmtpDeliveryConfig",
    "SmtpPolicy",
    "Upstream",
    "UpstreamAuth",
    "UpstreamPool",
    "cpu_count",
    "format_key",
    "load_config",
]
