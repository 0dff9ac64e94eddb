"""Loading a configuration file: read, parse with positions, interpolate, validate.

See the package docstring for the rules; errors are one :class:`ConfigError` naming every
problem with file, line and key.
"""

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import (
    ValidationError,
)

from smtpproxy.config.delivery import MaildirDeliveryConfig, SmtpDeliveryConfig
from smtpproxy.config.problems import ConfigError, Problem, format_key
from smtpproxy.config.schema import EMBEDDED_STORE, Config, Store
from smtpproxy.config.source import ConfigSource, parse_document, problem_order

# --------------------------------------------------------------------------- loading


def _resolve_paths(config: Config, base: Path) -> Config:
    """Copy of *config* with every relative path made absolute against *base*."""

    def resolve(path: Path) -> Path:
        return path if path.is_absolute() else base / path

    listeners = [
        listener.model_copy(
            update={
                "tls": listener.tls.model_copy(
                    update={"cert": resolve(listener.tls.cert), "key": resolve(listener.tls.key)}
                )
            }
        )
        if listener.tls is not None
        else listener
        for listener in config.listeners
    ]
    delivery: MaildirDeliveryConfig | SmtpDeliveryConfig
    if isinstance(config.delivery, MaildirDeliveryConfig):
        delivery = config.delivery.model_copy(update={"path": resolve(config.delivery.path)})
    elif config.delivery.ca_file is not None:
        delivery = config.delivery.model_copy(update={"ca_file": resolve(config.delivery.ca_file)})
    else:
        delivery = config.delivery
    quarantine = config.quarantine.model_copy(update={"path": resolve(config.quarantine.path)})
    store = config.store
    if store.sqlite is not None:
        store = store.model_copy(update={"sqlite": resolve(store.sqlite)})
    digest = config.digest.model_copy(update={
        "keys": [resolve(k) for k in config.digest.keys],
        "template": resolve(config.digest.template) if config.digest.template is not None else None,
    })
    console = config.console
    if console.users is not None:
        console = console.model_copy(update={"users": resolve(console.users)})
    pid_file = resolve(config.pid_file) if config.pid_file is not None else None
    limits = config.limits
    if limits.spool_directory is not None:
        limits = limits.model_copy(update={"spool_directory": resolve(limits.spool_directory)})
    return config.model_copy(update={"listeners": listeners, "delivery": delivery, "quarantine": quarantine,
                                     "store": store, "digest": digest, "console": console,
                                     "pid_file": pid_file, "limits": limits,
                                     "plugin_paths": [resolve(p) for p in config.plugin_paths]})


def _read_text(file: str) -> str:
    try:
        raw = Path(file).read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(
            [Problem(file, None, None, "", f"cannot read configuration file: {reason}")]
        ) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError([Problem(file, line, column, "", "file is not valid UTF-8 text")]) from None


def load_config(
    path: str | os.PathLike[str] | None, *, environ: Mapping[str, str] | None = None
) -> tuple[Config, ConfigSource | None]:
    """Load and validate a configuration file.

    ``path=None`` returns the embedded default :class:`Config` (relative paths resolved
    against the current directory): every default below, and an SQLite store in
    :data:`EMBEDDED_STORE` (a file needs a ``store:`` section for one); and no source.
    Otherwise the YAML file is read, environment variables from *environ* (default
    ``os.environ``) are interpolated, and the result is validated.  All problems found are
    raised together as a :class:`ConfigError`; the returned config has absolute paths.
    """
    if path is None:
        return _resolve_paths(Config(store=Store(sqlite=EMBEDDED_STORE)), Path.cwd()), None
    file = os.fspath(path)
    env: Mapping[str, str] = os.environ if environ is None else environ
    text = _read_text(file)
    loaded = parse_document(file, text, env)
    source = ConfigSource(file, loaded.root)
    base_dir = Path(file).absolute().parent
    problems = list(loaded.problems)
    config: Config | None = None
    try:
        config = Config.model_validate(loaded.data, context={"base_dir": base_dir})
    except ValidationError as exc:
        tainted = [format_key(p) for p in loaded.tainted]
        for problem in source.problems_from_validation_error(exc, model=Config):
            # A value whose interpolation failed is already reported; its follow-on
            # validation errors are noise.
            if any(problem.key == key or problem.key.startswith((key + ".", key + "[")) for key in tainted):
                continue
            problems.append(problem)
    if problems or config is None:
        problems.sort(key=problem_order)
        raise ConfigError(problems)
    return _resolve_paths(config, base_dir), source
