"""The ``smtpproxy`` command: run, check-config, plugins, quarantine, --version.

Exit codes: 0 success, 1 runtime failure (cannot listen, a plugin failed to start),
2 configuration error (the message names file, line and key).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from smtpproxy import __version__
from smtpproxy.config import Config, ConfigError, ConfigSource, load_config
from smtpproxy.eventlog import configure_logging
from smtpproxy.registry import build_chain, installed_plugins
from smtpproxy.server import ProxyServer, StartupError

__all__ = ["main"]

EXIT_RUNTIME = 1
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smtpproxy", description="A transparent, before-queue SMTP filtering proxy."
    )
    parser.add_argument("--version", action="version", version=f"smtpproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the proxy (without -c: the embedded default)")
    run.add_argument("-c", "--config", help="YAML configuration file")
    check = sub.add_parser("check-config", help="validate a configuration and its plugins")
    check.add_argument("-c", "--config", required=True, help="YAML configuration file")
    sub.add_parser("plugins", help="list installed plugins and the hooks each implements")
    quarantine = sub.add_parser("quarantine", help="list, show, release or delete quarantined messages")
    quarantine.add_argument("action", choices=["list", "show", "release", "delete"])
    quarantine.add_argument("ids", nargs="*", metavar="ID", help="quarantine id(s)")
    quarantine.add_argument("-c", "--config", required=True, help="YAML configuration file")
    return parser


def _load(path: str | None) -> tuple[Config, ConfigSource | None]:
    config, source = load_config(path)
    build_chain(config.plugins, source)  # plugin settings are part of a valid config
    return config, source


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "plugins":
        return _list_plugins()
    try:
        config, source = _load(args.config)
    except ConfigError as exc:
        print(f"smtpproxy: configuration error:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "quarantine":
        from smtpproxy.quarantine import admin_command

        return admin_command(config, args.action, args.ids)
    if args.command == "check-config":
        plugins = ", ".join(p.name for p in config.plugins if p.enabled) or "none"
        print(f"{args.config}: OK ({len(config.listeners)} listener(s), "
              f"delivery {config.delivery.type}, plugins: {plugins})")
        return 0
    configure_logging(config.logging.level, config.logging.format)
    try:
        asyncio.run(ProxyServer(config, source).serve_forever())
    except StartupError as exc:
        logging.getLogger("smtpproxy").error("event=startup_failed error=%s", exc)
        print(f"smtpproxy: cannot start: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        pass
    return 0


def _list_plugins() -> int:
    plugins = installed_plugins()
    if not plugins:
        print("no plugins installed (entry point group smtpproxy.plugins)")
        return 0
    width = max(len(p.name) for p in plugins)
    for p in plugins:
        where = f"{p.target} [{p.distribution}]" if p.distribution else p.target
        if p.error:
            print(f"{p.name:<{width}}  {where}\n{'':<{width}}  BROKEN: {p.error}")
        else:
            print(f"{p.name:<{width}}  {where}\n{'':<{width}}  hooks: {', '.join(p.hooks) or 'none'}")
    return 0
