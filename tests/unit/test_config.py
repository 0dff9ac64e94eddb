"""Tests for smtpproxy.config: schema defaults, loading, and located error messages."""

import ipaddress
import pickle
import textwrap
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from smtpproxy.config import (
    Config,
    ConfigError,
    ConfigSource,
    Limits,
    Listener,
    ListenerTLS,
    Logging,
    MaildirDeliveryConfig,
    PluginSpec,
    Problem,
    Quarantine,
    Relay,
    SmtpDeliveryConfig,
    SmtpPolicy,
    format_key,
    load_config,
)


def write(tmp_path: Path, text: str, name: str = "smtpproxy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def load_error(path: Path, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=environ or {})
    return info.value


def only_problem(path: Path, environ: dict[str, str] | None = None) -> Problem:
    error = load_error(path, environ)
    assert len(error.problems) == 1, str(error)
    return error.problems[0]


# ----------------------------------------------------------------------------- defaults


def test_embedded_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config, source = load_config(None)
    assert source is None
    assert len(config.listeners) == 1
    listener = config.listeners[0]
    assert (listener.address, listener.port) == ("127.0.0.1", 2525)
    assert listener.banner == "ESMTP smtpproxy"
    assert listener.tls is None
    assert listener.require_starttls is False
    assert config.limits == Limits(
        max_message_size=26214400,
        max_recipients=100,
        max_line_length=1000,
        max_command_line=512,
        max_commands=10000,
        max_errors=20,
        max_sessions=1000,
        max_sessions_per_ip=20,
        idle_timeout=300,
        data_timeout=600,
        session_timeout=3600,
        shutdown_grace=30,
    )
    assert config.smtp.bare_newlines == "reject"
    assert config.smtp.smtputf8 is True
    assert config.smtp.pipelining is True
    assert config.relay.domains == ["localhost", "*.localhost", "*.test", "*.example", "*.invalid"]
    assert config.relay.networks == []
    assert config.relay.allow_authenticated is True
    assert isinstance(config.delivery, MaildirDeliveryConfig)
    # Relative paths of the embedded default are resolved against the current directory.
    assert config.delivery.path == tmp_path / "mail"
    assert config.quarantine.path == tmp_path / "quarantine"
    assert config.store.sqlite == tmp_path / "smtpproxy.db"  # the embedded default's store: SQLite
    assert not Config().store.configured  # a configuration file has one only when it says so
    assert config.plugins == []
    assert (config.logging.level, config.logging.format) == ("info", "kv")
    assert config.hostname is None


def test_models_are_frozen_and_strict() -> None:
    config = Config()
    with pytest.raises(ValidationError):
        config.hostname = "x"
    assert Config().delivery == MaildirDeliveryConfig(path=Path("mail"))  # unresolved without loading
    with pytest.raises(ValidationError):
        Listener(port="25")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        Listener(require_starttls="yes")  # type: ignore[arg-type]


ALL_MODELS: list[type[BaseModel]] = [
    Config,
    Listener,
    ListenerTLS,
    Limits,
    SmtpPolicy,
    Relay,
    MaildirDeliveryConfig,
    SmtpDeliveryConfig,
    Quarantine,
    PluginSpec,
    Logging,
]


def test_every_field_has_a_description_and_schema_builds() -> None:
    schema = Config.model_json_schema()
    assert schema["properties"]["delivery"]["discriminator"]["propertyName"] == "type"
    assert schema["properties"]["relay"]["$ref"]
    for model in ALL_MODELS:
        assert model.model_config.get("extra") == "forbid"
        assert model.model_config.get("frozen") is True
        assert model.__doc__
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no description"
            assert info.description.endswith("."), f"{model.__name__}.{name}"


# ----------------------------------------------------------------------------- full file

FULL = """
hostname: mx1.example.net
listeners:
  - address: 0.0.0.0
    port: 25
    banner: ESMTP filter ready
    tls:
      cert: certs/server.pem
      key: certs/server.key
      min_version: TLSv1.3
    require_starttls: true
  - address: "::1"
    port: 587
limits:
  max_message_size: 10485760
  max_recipients: 50
  max_line_length: 2000
  max_command_line: 1024
  max_commands: 500
  max_errors: 5
  max_sessions: 200
  max_sessions_per_ip: 10
  idle_timeout: 60
  data_timeout: 120.5
  session_timeout: 900
  shutdown_grace: 5
smtp:
  bare_newlines: normalize
  smtputf8: false
  pipelining: false
relay:
  domains: [Example.ORG, "*.example.net", "bücher.example"]
  networks: [192.0.2.0/24, "2001:db8::/32", 10.1.2.3]
  allow_authenticated: false
delivery:
  type: smtp
  host: mail.internal.example
  port: 10025
  tls: starttls
  tls_verify: false
  ca_file: ca.pem
  tls_hostname: mx.internal.example
  helo_name: "[192.0.2.1]"
  connect_timeout: 5
  command_timeout: 10
  data_timeout: 30
quarantine:
  path: ../quarantine
plugins:
  - name: headers
    settings:
      add: {X-Filtered: "yes"}
  - name: spam.check
    use: "acme.spam:Checker"
    enabled: false
    timeout: 2.5
    on_error: continue
    settings:
      threshold: 5
logging:
  level: debug
  format: json
"""


def test_full_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    confdir = tmp_path / "etc"
    (confdir / "certs").mkdir(parents=True)
    (confdir / "certs" / "server.pem").write_text("cert")
    (confdir / "certs" / "server.key").write_text("key")
    (confdir / "ca.pem").write_text("ca")
    path = write(confdir, FULL)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths must not depend on the cwd

    config, source = load_config(path, environ={})

    assert isinstance(source, ConfigSource)
    assert source.file == str(path)
    assert config.hostname == "mx1.example.net"
    first, second = config.listeners
    assert (first.address, first.port, first.banner) == ("0.0.0.0", 25, "ESMTP filter ready")
    assert first.tls is not None
    assert first.tls.cert == confdir / "certs" / "server.pem"
    assert first.tls.key == confdir / "certs" / "server.key"
    assert first.tls.min_version == "TLSv1.3"
    assert first.require_starttls is True
    assert (second.address, second.port, second.tls) == ("::1", 587, None)
    assert config.limits.max_line_length == 2000
    assert config.limits.data_timeout == 120.5
    assert config.limits.max_sessions_per_ip == 10
    assert config.smtp.bare_newlines == "normalize"
    assert config.smtp.smtputf8 is False
    assert config.relay.domains == ["example.org", "*.example.net", "xn--bcher-kva.example"]
    assert config.relay.networks == [
        ipaddress.ip_network("192.0.2.0/24"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("10.1.2.3/32"),
    ]
    assert config.relay.allow_authenticated is False
    delivery = config.delivery
    assert isinstance(delivery, SmtpDeliveryConfig)
    assert (delivery.host, delivery.port, delivery.tls) == ("mail.internal.example", 10025, "starttls")
    assert delivery.tls_verify is False
    assert delivery.ca_file == confdir / "ca.pem"
    assert delivery.tls_hostname == "mx.internal.example"
    assert delivery.helo_name == "[192.0.2.1]"
    assert (delivery.connect_timeout, delivery.command_timeout, delivery.data_timeout) == (5, 10, 30)
    assert config.quarantine.path == confdir / ".." / "quarantine"
    headers, spam = config.plugins
    assert (headers.name, headers.use, headers.enabled, headers.timeout) == ("headers", None, True, 10)
    assert headers.on_error == "tempfail"
    assert headers.settings == {"add": {"X-Filtered": "yes"}}
    assert (spam.name, spam.use, spam.enabled, spam.timeout) == (
        "spam.check",
        "acme.spam:Checker",
        False,
        2.5,
    )
    assert spam.on_error == "continue"
    assert spam.settings == {"threshold": 5}
    assert (config.logging.level, config.logging.format) == ("debug", "json")

    assert source.locate(("plugins", 1, "settings", "threshold")) == (58, 7)
    assert source.locate(("listeners", 0, "tls", "key")) == (8, 7)
    assert source.locate(("listeners", 1)) == (11, 5)


def test_maildir_and_quarantine_paths_resolved_against_file(tmp_path: Path) -> None:
    path = write(tmp_path, "delivery:\n  type: maildir\n  path: spool/mail\nquarantine:\n  path: /abs/q\n")
    config, _ = load_config(path, environ={})
    assert config.delivery == MaildirDeliveryConfig(path=tmp_path / "spool" / "mail")
    assert config.quarantine.path == Path("/abs/q")


def test_defaults_resolved_against_file_directory(tmp_path: Path) -> None:
    path = write(tmp_path, "logging: {level: warning}\n")
    config, _ = load_config(path, environ={})
    assert isinstance(config.delivery, MaildirDeliveryConfig)
    assert config.delivery.path == tmp_path / "mail"
    assert config.quarantine.path == tmp_path / "quarantine"


def test_null_means_default(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        limits:
          # max_sessions: 10
        plugins:
        relay:
          domains:
        hostname:
        """,
    )
    config, _ = load_config(path, environ={})
    assert config.limits == Limits()
    assert config.plugins == []
    assert config.relay.domains == Config().relay.domains
    assert config.hostname is None


def test_anchors_and_merge_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        x-common: &common
          timeout: 3
          on_error: continue
        plugins:
          - <<: *common
            name: one
          - <<: *common
            name: two
            timeout: 4
        """,
    )
    error = load_error(path)  # x-common is not a known key
    assert str(error) == f"{path}:1:1: x-common: unknown key"
    path = write(
        tmp_path,
        """
        plugins:
          - &first
            name: one
            timeout: 3
            on_error: continue
          - <<: *first
            name: two
            timeout: 4
          - <<: *first
            name: Bad
        """,
    )
    problem = only_problem(path)
    assert problem.key == "plugins[2].name"
    assert problem.line == 10
    path.write_text(path.read_text().replace("Bad", "three"))
    config, _ = load_config(path, environ={})
    assert [(p.name, p.timeout, p.on_error) for p in config.plugins] == [
        ("one", 3, "continue"),
        ("two", 4, "continue"),
        ("three", 3, "continue"),
    ]


# ----------------------------------------------------------------------------- YAML syntax


def test_bad_indentation(tmp_path: Path) -> None:
    path = write(tmp_path, "limits:\n  max_sessions: 5\n   max_errors: 3\nsmtp: {}\n")
    problem = only_problem(path)
    assert str(problem) == f"{path}:3:14: YAML syntax error: mapping values are not allowed here"


def test_tab_character(tmp_path: Path) -> None:
    path = write(tmp_path, "limits:\n  max_sessions: 5\n\tmax_errors: 3\n")
    message = str(load_error(path))
    assert message.startswith(f"{path}:3:1: YAML syntax error: found character '\\t'")
    assert "cannot start any token" in message


def test_unclosed_quote(tmp_path: Path) -> None:
    path = write(tmp_path, 'hostname: mx.example\nlisteners:\n  - banner: "hello\n    port: 25\n')
    message = str(load_error(path))
    assert message.startswith(f"{path}:3:13: YAML syntax error: found unexpected end of stream")
    assert "quoted scalar" in message


def test_unclosed_flow_sequence(tmp_path: Path) -> None:
    path = write(tmp_path, "relay:\n  domains: [a.example, b.example\nlogging: {}\n")
    message = str(load_error(path))
    assert message.startswith(f"{path}:3:")
    assert "started at line 2" in message


def test_two_documents(tmp_path: Path) -> None:
    path = write(tmp_path, "hostname: a.example\n---\nhostname: b.example\n")
    assert f"{path}:2:1: YAML syntax error" in str(load_error(path))


def test_control_character(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("hostname: a\x01b\n")
    assert str(load_error(path)).startswith(f"{path}:1:12: YAML syntax error: unacceptable character #x0001")


def test_unknown_tag(tmp_path: Path) -> None:
    path = write(tmp_path, "limits:\n  max_sessions: !!python/object:os.system x\n")
    problem = only_problem(path)
    assert (problem.line, problem.key) == (2, "limits.max_sessions")
    assert "python/object" in problem.message


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"hostname: a\nbanner: caf\xe9\n")
    assert str(load_error(path)) == f"{path}:2:12: file is not valid UTF-8 text"


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing here\n")
    assert str(load_error(path)) == f"{path}: file is empty: expected a mapping of settings"


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "\n- listeners\n- limits\n")
    assert str(load_error(path)) == (f"{path}:1:1: the top level must be a mapping of settings (got a list)")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert str(load_error(path)) == f"{path}: cannot read configuration file: No such file or directory"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert str(load_error(tmp_path)).startswith(f"{tmp_path}: cannot read configuration file: ")


def test_deeply_nested(tmp_path: Path) -> None:
    path = write(tmp_path, "plugins: " + "[" * 5000 + "]" * 5000 + "\n")
    error = load_error(path)
    assert str(error).startswith(str(path))


def test_recursive_alias(tmp_path: Path) -> None:
    path = write(tmp_path, "plugins: &p\n  - *p\n")
    problem = only_problem(path)
    assert (problem.line, problem.key) == (1, "plugins[0]")  # the anchor
    assert "recursive alias" in problem.message


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    path = write(tmp_path, "limits:\n  max_sessions: 5\n  max_errors: 3\n  max_sessions: 7\n")
    assert str(load_error(path)) == (
        f"{path}:4:3: limits.max_sessions: duplicate key (first defined at line 2)"
    )


# ----------------------------------------------------------------------------- schema errors


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path, "listener:\n  - port: 25\n")
    assert str(load_error(path)) == f"{path}:1:1: listener: unknown key (did you mean 'listeners'?)"


def test_unknown_nested_key(tmp_path: Path) -> None:
    path = write(tmp_path, "hostname: mx.example\nlisteners:\n  - prot: 25\n")
    assert str(load_error(path)) == f"{path}:3:5: listeners[0].prot: unknown key (did you mean 'port'?)"


def test_unknown_key_without_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "limits:\n  zzz: 1\n")
    assert str(load_error(path)) == f"{path}:2:3: limits.zzz: unknown key"


def test_unknown_key_in_tagged_union_member(tmp_path: Path) -> None:
    path = write(tmp_path, "delivery:\n  type: smtp\n  host: mx.example\n  tls_verfy: false\n")
    assert str(load_error(path)) == (
        f"{path}:4:3: delivery.tls_verfy: unknown key (did you mean 'tls_verify'?)"
    )


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        (
            "listeners:\n  - port: abc\n",
            "2:5: listeners[0].port",
            "Input should be a valid integer (got 'abc')",
        ),
        (
            "listeners:\n  - port: 70000\n",
            "2:5: listeners[0].port",
            "Input should be less than or equal to 65535 (got 70000)",
        ),
        (
            "listeners:\n  - port: 3.7\n",
            "2:5: listeners[0].port",
            "Input should be a valid integer (got 3.7)",
        ),
        (
            "limits:\n  max_sessions: true\n",
            "2:3: limits.max_sessions",
            "Input should be a valid integer (got True)",
        ),
        (
            "limits:\n    max_sessions: lots\n",
            "2:5: limits.max_sessions",
            "Input should be a valid integer (got 'lots')",
        ),
        (
            "smtp:\n  pipelining: 'yes'\n",
            "2:3: smtp.pipelining",
            "Input should be a valid boolean (got 'yes')",
        ),
        (
            "limits:\n  idle_timeout: .inf\n",
            "2:3: limits.idle_timeout",
            "Input should be a finite number (got inf)",
        ),
        (
            "limits:\n  max_line_length: 999\n",
            "2:3: limits.max_line_length",
            "Input should be greater than or equal to 1000 (got 999)",
        ),
        (
            "limits:\n  max_sessions: 10\n  max_sessions_per_ip: 11\n",
            "3:3: limits.max_sessions_per_ip",
            "must not be larger than max_sessions (10) (got 11)",
        ),
        (
            "listeners: []\n",
            "1:1: listeners",
            "List should have at least 1 item after validation, not 0 (got a list)",
        ),
        (
            "limits: 5\n",
            "1:1: limits",
            "Input should be a mapping of settings (got 5)",
        ),
        (
            "smtp:\n  bare_newlines: fix\n",
            "2:3: smtp.bare_newlines",
            "Input should be 'reject' or 'normalize' (got 'fix')",
        ),
        (
            "listeners:\n  - address: mail.example\n",
            "2:5: listeners[0].address",
            "must be an IP address such as '127.0.0.1', '0.0.0.0' or '::' "
            "(host names are not allowed; got 'mail.example')",
        ),
        (
            'listeners:\n  - banner: "hi\\r\\nthere"\n',
            "2:5: listeners[0].banner",
            "must be printable ASCII text without control characters or line breaks",
        ),
        (
            "hostname: not a host\n",
            "1:1: hostname",
            "must be a host name such as 'mail.example.com' or an address literal such as "
            "'[192.0.2.1]' (got 'not a host')",
        ),
        (
            "plugins:\n  - name: Spam\n",
            "2:5: plugins[0].name",
            "must consist of lower-case letters, digits, '_', '.' and '-' (got 'Spam')",
        ),
        (
            "plugins:\n  - name: spam\n    use: 'not valid!'\n",
            "3:5: plugins[0].use",
            "must be an entry point name or 'package.module:Class' (got 'not valid!')",
        ),
        (
            "plugins:\n  - {name: spam, settings: {1: x}}\n",
            "2:29: plugins[0].settings[1]",
            "Input should be a valid string (got 1)",
        ),
        (
            "quarantine:\n  path: 5\n",
            "2:3: quarantine.path",
            "must be a path written as a string (got 5)",
        ),
        (
            "delivery: smtp\n",
            "1:1: delivery",
            "Input should be a mapping of settings (got 'smtp')",
        ),
        (
            "quarantine:\n  path: ''\n",
            "2:3: quarantine.path",
            "must not be empty",
        ),
    ],
)
def test_wrong_values(tmp_path: Path, text: str, where: str, message: str) -> None:
    path = write(tmp_path, text)
    assert str(load_error(path)) == f"{path}:{where}: {message}"


def test_missing_required_key(tmp_path: Path) -> None:
    path = write(tmp_path, "logging: {}\ndelivery:\n  type: smtp\n  port: 25\n")
    assert str(load_error(path)) == (
        f"{path}:2:1: delivery.host: give either 'host' (one server) or 'upstreams' (several)"
    )


def test_bad_delivery_type(tmp_path: Path) -> None:
    path = write(tmp_path, "delivery:\n  path: /var/mail\n  type: lmtp\n")
    assert (
        str(load_error(path)) == f"{path}:3:3: delivery.type: must be one of 'maildir', 'smtp' (got 'lmtp')"
    )


def test_delivery_without_type(tmp_path: Path) -> None:
    path = write(tmp_path, "delivery:\n  host: mx.example\n")
    assert str(load_error(path)) == (
        f"{path}:1:1: delivery.type: Field required; must be one of 'maildir', 'smtp'"
    )


def test_duplicate_plugin_names(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        plugins:
          - name: headers
          - name: spam
          - use: headers
            name: headers
        """,
    )
    assert str(load_error(path)) == (
        f"{path}:5:5: plugins[2].name: plugin name 'headers' is already used by plugins[0]"
    )


def test_duplicate_listeners(tmp_path: Path) -> None:
    path = write(tmp_path, "listeners:\n  - port: 25\n  - port: 26\n  - port: 25\n")
    assert str(load_error(path)) == (
        f"{path}:4:5: listeners[2].port: 127.0.0.1 port 25 is already used by listeners[0]"
    )


def test_require_starttls_without_tls(tmp_path: Path) -> None:
    path = write(tmp_path, "listeners:\n  - port: 25\n    require_starttls: true\n")
    assert str(load_error(path)) == (
        f"{path}:3:5: listeners[0].require_starttls: "
        "require_starttls needs a 'tls' section (cert and key) on this listener"
    )


def test_missing_tls_cert(tmp_path: Path) -> None:
    (tmp_path / "server.key").write_text("key")
    path = write(
        tmp_path,
        """
        listeners:
          - port: 25
            tls:
              cert: missing.pem
              key: server.key
        """,
    )
    assert str(load_error(path)) == (
        f"{path}:4:7: listeners[0].tls.cert: file not found: {tmp_path / 'missing.pem'}"
    )


def test_tls_cert_is_directory_and_ca_file_missing(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "server.key").write_text("key")
    path = write(
        tmp_path,
        """
        listeners:
          - tls: {cert: certs, key: server.key}
        delivery: {type: smtp, host: 192.0.2.25, ca_file: /nonexistent/ca.pem}
        """,
    )
    assert str(load_error(path)).splitlines() == [
        f"{path}:2:11: listeners[0].tls.cert: not a regular file: {tmp_path / 'certs'}",
        f"{path}:3:42: delivery.ca_file: file not found: /nonexistent/ca.pem",
    ]


def test_network_with_host_bits(tmp_path: Path) -> None:
    path = write(tmp_path, "relay:\n  networks:\n    - 10.0.0.0/8\n    - 127.0.0.1/8\n")
    assert str(load_error(path)) == (
        f"{path}:4:7: relay.networks[1]: '127.0.0.1/8' has host bits set; did you mean '127.0.0.0/8'?"
    )


def test_bad_network(tmp_path: Path) -> None:
    path = write(tmp_path, "relay:\n  networks: [10.0.0.0/33, 5]\n")
    assert str(load_error(path)).splitlines() == [
        f"{path}:2:14: relay.networks[0]: must be a network such as '192.0.2.0/24', "
        "'2001:db8::/32' or a single address (got '10.0.0.0/33')",
        f"{path}:2:27: relay.networks[1]: must be a network such as '192.0.2.0/24', "
        "'2001:db8::/32' or a single address (got 5)",
    ]


def test_bad_relay_domain(tmp_path: Path) -> None:
    path = write(tmp_path, "relay:\n  domains:\n    - example.com\n    - exa_mple.com\n    - '*'\n")
    assert str(load_error(path)).splitlines() == [
        f"{path}:4:7: relay.domains[1]: must be a domain such as 'example.com' or a wildcard "
        "such as '*.example.com' (got 'exa_mple.com')",
        f"{path}:5:7: relay.domains[2]: must be a domain such as 'example.com' or a wildcard "
        "such as '*.example.com' (got '*')",
    ]


def test_relay_domains_lower_cased(tmp_path: Path) -> None:
    path = write(tmp_path, "relay:\n  domains: [Example.COM., '*.Sub.Example']\n")
    config, _ = load_config(path, environ={})
    assert config.relay.domains == ["example.com", "*.sub.example"]


def test_multiple_problems_all_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        listeners:
          - prot: 25
          - port: "abc"
        limits:
          max_sessions: lots
        delivery:
          type: smtp
        plugins:
          - name: a
          - name: a
        loging: {level: debug}
        relay:
          limits: 3
          limits: 4
        """,
    )
    lines = str(load_error(path)).splitlines()
    assert lines == [
        f"{path}:2:5: listeners[0].prot: unknown key (did you mean 'port'?)",
        f"{path}:3:5: listeners[1].port: Input should be a valid integer (got 'abc')",
        f"{path}:5:3: limits.max_sessions: Input should be a valid integer (got 'lots')",
        f"{path}:6:1: delivery.host: give either 'host' (one server) or 'upstreams' (several)",
        f"{path}:10:5: plugins[1].name: plugin name 'a' is already used by plugins[0]",
        f"{path}:11:1: loging: unknown key (did you mean 'logging'?)",
        f"{path}:14:3: relay.limits: duplicate key (first defined at line 13)",
        f"{path}:14:3: relay.limits: unknown key",
    ]


# ----------------------------------------------------------------------------- environment


def test_missing_environment_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "hostname: mx.example\ndelivery:\n  type: smtp\n  host: ${RELAY_HOST}\n")
    assert str(load_error(path, {"OTHER": "x"})) == (
        f"{path}:4:9: delivery.host: environment variable RELAY_HOST is not set"
    )


def test_environment_values_and_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        hostname: ${HOST:-mx.default.example}
        listeners:
          - port: ${PORT}
            banner: "ESMTP ${NAME:-proxy} costs $$5, $HOME stays"
        delivery:
          type: smtp
          host: ${RELAY}
          tls_verify: ${VERIFY:-false}
        plugins:
          - name: p
            settings:
              password: "${SECRET}"
              number: "${PORT}"
        """,
    )
    environ = {"PORT": "2626", "RELAY": "relay.example", "SECRET": "s3cr$t", "HOST": ""}
    config, _ = load_config(path, environ=environ)
    assert config.hostname == "mx.default.example"  # set but empty -> default
    assert config.listeners[0].port == 2626  # unquoted: typed like YAML would type "2626"
    assert config.listeners[0].banner == "ESMTP proxy costs $5, $HOME stays"
    assert isinstance(config.delivery, SmtpDeliveryConfig)
    assert config.delivery.host == "relay.example"
    assert config.delivery.tls_verify is False
    assert config.plugins[0].settings == {"password": "s3cr$t", "number": "2626"}


def test_quoted_environment_value_stays_a_string(tmp_path: Path) -> None:
    path = write(tmp_path, 'listeners:\n  - port: "${PORT}"\n')
    assert str(load_error(path, {"PORT": "25"})) == (
        f"{path}:2:5: listeners[0].port: Input should be a valid integer (got '25')"
    )


def test_dollar_escape(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        plugins:
          - name: p
            settings:
              a: $${NOT_A_VAR}
              b: a$$b
              c: $$$$
              d: '$$'
              e: $5 and $ and $x{y}
        """,
    )
    config, _ = load_config(path, environ={})
    assert config.plugins[0].settings == {
        "a": "${NOT_A_VAR}",
        "b": "a$b",
        "c": "$$",
        "d": "$",
        "e": "$5 and $ and $x{y}",
    }


def test_invalid_environment_reference(tmp_path: Path) -> None:
    path = write(tmp_path, "hostname: mx.example\nlisteners:\n  - banner: ab${FOO-bar}\n")
    assert str(load_error(path)) == (
        f"{path}:3:13: listeners[0].banner: invalid environment variable reference '${{FOO-bar}}': "
        "use ${NAME}, ${NAME:-default}, or $$ for a literal '$'"
    )


def test_environment_not_interpolated_in_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "plugins:\n  - name: p\n    settings:\n      ${KEY}: 1\n")
    config, _ = load_config(path, environ={"KEY": "k"})
    assert config.plugins[0].settings == {"${KEY}": 1}


def test_environment_defaults_to_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMTPPROXY_TEST_HOST", "from-env.example")
    path = write(tmp_path, "hostname: ${SMTPPROXY_TEST_HOST}\n")
    config, _ = load_config(path)
    assert config.hostname == "from-env.example"


def test_missing_variable_and_other_problems(tmp_path: Path) -> None:
    path = write(tmp_path, "listeners:\n  - port: ${PORT}\n    address: nowhere\n")
    assert str(load_error(path)).splitlines() == [
        f"{path}:2:11: listeners[0].port: environment variable PORT is not set",
        f"{path}:3:5: listeners[0].address: must be an IP address such as '127.0.0.1', "
        "'0.0.0.0' or '::' (host names are not allowed; got 'nowhere')",
    ]


# ----------------------------------------------------------------------------- helpers / API


def test_format_key() -> None:
    assert format_key(("listeners", 0, "port")) == "listeners[0].port"
    assert format_key(()) == ""
    assert format_key(("plugins", 2, "settings", "a.b", "x-y")) == 'plugins[2].settings["a.b"].x-y'
    assert format_key((0, "a")) == "[0].a"


def test_problem_str() -> None:
    assert str(Problem("f.yaml", 3, 4, "a.b", "bad")) == "f.yaml:3:4: a.b: bad"
    assert str(Problem("f.yaml", 3, None, "", "bad")) == "f.yaml:3: bad"
    assert str(Problem("f.yaml", None, None, "", "bad")) == "f.yaml: bad"


def test_config_error_pickles() -> None:
    error = ConfigError([Problem("f.yaml", 1, 2, "k", "m"), Problem("f.yaml", 3, 4, "", "n")])
    assert str(error) == "f.yaml:1:2: k: m\nf.yaml:3:4: n"
    copy = pickle.loads(pickle.dumps(error))
    assert copy.problems == error.problems


class SpamSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    threshold: float = Field(default=5.0, strict=True)
    action: Literal["reject", "tag"] = "tag"
    servers: list[str] = []


PLUGIN_FILE = """
plugins:
  - name: spam
    settings:
      threshhold: 3
      action: drop
      servers: [a, 3]
"""


def test_plugin_settings_validated_later(tmp_path: Path) -> None:
    path = write(tmp_path, PLUGIN_FILE)
    config, source = load_config(path, environ={})
    assert source is not None
    with pytest.raises(ValidationError) as info:
        SpamSettings.model_validate(config.plugins[0].settings)
    base = ("plugins", 0, "settings")
    problems = [str(p) for p in source.problems_from_validation_error(info.value, base)]
    assert problems == [
        f"{path}:4:7: plugins[0].settings.threshhold: unknown key (did you mean 'threshold'?)",
        f"{path}:5:7: plugins[0].settings.action: Input should be 'reject' or 'tag' (got 'drop')",
        f"{path}:6:20: plugins[0].settings.servers[1]: Input should be a valid string (got 3)",
    ]
    # With an explicit model, and without: same result for an unambiguous title.
    assert [
        str(p) for p in source.problems_from_validation_error(info.value, base, model=SpamSettings)
    ] == problems


def test_plugin_settings_absent_from_file(tmp_path: Path) -> None:
    class Needs(BaseModel):
        url: str

    path = write(tmp_path, "plugins:\n  - name: web\n")
    config, source = load_config(path, environ={})
    assert source is not None
    with pytest.raises(ValidationError) as info:
        Needs.model_validate(config.plugins[0].settings)
    assert [
        str(p) for p in source.problems_from_validation_error(info.value, ("plugins", 0, "settings"))
    ] == [f"{path}:2:5: plugins[0].settings.url: Field required"]


def test_union_errors_collapse_to_one_problem(tmp_path: Path) -> None:
    class Opt(BaseModel):
        limit: int | str
        mode: Literal["a"] | list[int] = "a"

    path = write(tmp_path, "plugins:\n  - name: x\n    settings:\n      limit: [1]\n      mode: [b]\n")
    config, source = load_config(path, environ={})
    assert source is not None
    with pytest.raises(ValidationError) as info:
        Opt.model_validate(config.plugins[0].settings)
    problems = [str(p) for p in source.problems_from_validation_error(info.value, ("plugins", 0, "settings"))]
    assert problems == [
        f"{path}:4:7: plugins[0].settings.limit: Input should be a valid integer (got a list); "
        "or Input should be a valid string (got a list)",
        f"{path}:5:7: plugins[0].settings.mode: Input should be 'a' (got a list)",
        f"{path}:5:14: plugins[0].settings.mode[0]: Input should be a valid integer, "
        "unable to parse string as an integer (got 'b')",
    ]


def test_locate_falls_back_to_nearest_ancestor(tmp_path: Path) -> None:
    path = write(tmp_path, "limits:\n  max_sessions: 5\nplugins:\n  - name: a\n")
    _, source = load_config(path, environ={})
    assert source is not None
    assert source.locate(()) == (1, 1)
    assert source.locate(("limits", "max_sessions")) == (2, 3)
    assert source.locate(("limits", "max_errors")) == (1, 1)
    assert source.locate(("plugins", 0)) == (4, 5)
    assert source.locate(("plugins", 7, "name")) == (3, 1)
    assert source.locate(("nothing", "here")) == (1, 1)
    assert str(source.problem(("plugins", 0, "name"), "nope")) == f"{path}:4:5: plugins[0].name: nope"


# ----------------------------------------------------------------------------- robustness

FIELD_NAMES = sorted({name for model in ALL_MODELS for name in model.model_fields})

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["smtp", "maildir", "127.0.0.1", "0.0.0.0", "10.0.0.0/8", "${X}", "$$", "a.b"])
    | st.text(max_size=20)
)
keys = st.sampled_from(FIELD_NAMES) | st.text(max_size=10)
documents = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=30,
)


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=documents)
def test_arbitrary_yaml_documents_only_raise_config_error(tmp_path: Path, data: Any) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    try:
        config, source = load_config(path, environ={"X": "1"})
    except ConfigError as error:
        assert error.problems
        for problem in error.problems:
            assert problem.file == str(path)
            assert "Traceback" not in str(problem)
    else:
        assert isinstance(config, Config)
        assert source is not None


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(text=st.text(alphabet=st.sampled_from(list("ab: -[]{}\n\t'\"#&*!|>$%@`,?~0.")), max_size=60))
def test_arbitrary_text_only_raises_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path, environ={})
    except ConfigError as error:
        assert error.problems
