"""The ``smtpproxy`` command: run, milter, check-config, reload, plugins, quarantine, test-message.

Exit codes: 0 success, 1 runtime failure (cannot listen, a plugin failed to start),
2 configuration error (the message names file, line and key).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from smtpproxy import __version__, eventloop
from smtpproxy.config import Config, ConfigError, ConfigSource, load_config
from smtpproxy.eventlog import configure_logging, event
from smtpproxy.registry import build_chain, installed_plugins
from smtpproxy.server import ProxyServer
from smtpproxy.startup import StartupError
from smtpproxy.versions import LOG_FORMAT_VERSION, PLUGIN_API_VERSION

__all__ = ["main"]

EXIT_RUNTIME = 1
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smtpproxy", description="A transparent, before-queue SMTP filtering proxy."
    )
    parser.add_argument("--version", action="version", version=(
        f"smtpproxy {__version__} (plugin API {PLUGIN_API_VERSION}, log format {LOG_FORMAT_VERSION})"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the proxy (without -c: the embedded default)")
    run.add_argument("-c", "--config", help="YAML configuration file")
    run.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # set by the workers supervisor
    milter = sub.add_parser(
        "milter", help="serve the plugin chain to Postfix/Sendmail over the milter protocol"
    )
    milter.add_argument("-c", "--config", help="YAML configuration file (milter: section)")
    check = sub.add_parser("check-config", help="validate a configuration and its plugins")
    check.add_argument("-c", "--config", required=True, help="YAML configuration file")
    sub.add_parser("plugins", help="list installed plugins and the hooks each implements")
    quarantine = sub.add_parser(
        "quarantine", help="list, show, release or delete quarantined messages",
        description="Options and ids may come in any order. The plugins are not loaded.",
    )
    actions = quarantine.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("list", "list the quarantined messages"),
                         ("show", "print one message's record and headers"),
                         ("release", "deliver messages upstream and remove them from the quarantine"),
                         ("delete", "remove messages from the quarantine")):
        one = actions.add_parser(action, help=text)
        if action != "list":
            one.add_argument("ids", nargs="*", metavar="ID", help="quarantine id(s)")
        one.add_argument("-c", "--config", required=True, help="YAML configuration file")
    trace = sub.add_parser(
        "test-message",
        help="run the plugin chain offline over a message (or a directory of *.eml) and explain it",
        description="Exit codes: 0 accepted, 3 rejected, 4 tempfailed, 5 discarded, 6 quarantined, "
        "2 usage or configuration error, 1 a plugin failed to start. For a directory: 0 when every "
        "file was traced, 1 when a file could not be read.",
    )
    trace.add_argument("message", metavar="MESSAGE", help="an .eml file, or a directory of them")
    trace.add_argument("--from", dest="sender", required=True, help="envelope sender ('' for <>)")
    trace.add_argument("--rcpt", action="append", required=True, help="envelope recipient (repeatable)")
    trace.add_argument("--client-ip", default="192.0.2.1", help="client address (default 192.0.2.1)")
    trace.add_argument("--client-port", type=int, default=0, help="client port")
    trace.add_argument("--helo", default="client.example", help="HELO/EHLO name")
    trace.add_argument("--auth-user", help="treat the client as authenticated as this user")
    trace.add_argument("--tls", action="store_true", help="treat the session as TLS-protected")
    trace.add_argument("--json", action="store_true", help="print JSON instead of the text report")
    trace.add_argument("-c", "--config", help="YAML configuration file (default: the embedded one)")
    tables = sub.add_parser(
        "tables", help="look into lookup tables; add and remove entries of redis and file tables",
        description="Exit codes: 0 done (query: found), 1 the backend failed, 2 usage or "
        "configuration error, 3 query: not found (remove: nothing to remove). docs/tables.md",
    )
    table_actions = tables.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("list", "print the entries (inline, file and redis tables)"),
                         ("query", "look one key up as the proxy would"),
                         ("add", "add an entry to a key's value"),
                         ("remove", "remove an entry from a key's value (or, without one, the key)")):
        one = table_actions.add_parser(action, help=text)
        one.add_argument("-c", "--config", required=True, help="YAML configuration file")
        one.add_argument("table", metavar="TABLE", help="a table name from tables:")
        one.add_argument("key", metavar="KEY", nargs="?" if action in ("list",) else None)
        if action in ("add", "remove"):
            one.add_argument("value", metavar="VALUE", nargs=None if action == "add" else "?")
    reload = sub.add_parser(
        "reload", help="validate the configuration, then tell the running proxy to reload it (SIGHUP)",
        description="Exit codes: 0 signal sent, 2 configuration error (nothing is signalled), "
        "1 no running proxy found.",
    )
    reload.add_argument("-c", "--config", required=True, help="YAML configuration file")
    reload.add_argument("--pid", type=int, help="process id of the proxy (default: read pid_file)")
    return parser


def _load(path: str | None, *, plugins: bool = True) -> tuple[Config, ConfigSource | None]:
    config, source = load_config(path)
    if plugins:  # plugin settings are part of a valid config
        build_chain(config.plugins, source, plugin_paths=config.plugin_paths, table_names=config.tables)
    return config, source


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse; ``quarantine release A -c FILE B`` gets both ids (argparse stops at the option)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "ids", None) is not None and not any(x.startswith("-") for x in extra):
        args.ids.extend(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if args.command == "plugins":
        return _list_plugins()
    try:
        # The quarantine commands never run plugins, so they work where those cannot be imported.
        config, source = _load(args.config, plugins=args.command not in ("quarantine", "tables"))
    except ConfigError as exc:
        print(f"smtpproxy: configuration error:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "quarantine":
        from smtpproxy.quarantine_cli import admin_command

        return admin_command(config, args.action, getattr(args, "ids", []))
    if args.command == "tables":
        from smtpproxy.tables_cli import tables_command

        return tables_command(config, args.action, args.table, args.key, getattr(args, "value", None))
    if args.command == "reload":
        return _signal_reload(config, args.config, args.pid)
    if args.command == "test-message":
        from smtpproxy.trace_report import TraceRequest, trace_command

        configure_logging("warning", config.logging.format)  # plugin failures, on stderr
        request = TraceRequest(args.sender, args.rcpt, args.client_ip, args.client_port, args.helo,
                               args.auth_user, args.tls)
        return trace_command(config, source, args.message, request, as_json=args.json)
    if args.command == "check-config":
        plugins = ", ".join(p.name for p in config.plugins if p.enabled) or "none"
        print(f"{args.config}: OK ({len(config.listeners)} listener(s), "
              f"delivery {config.delivery.type}, plugins: {plugins})")
        return 0
    configure_logging(config.logging.level, config.logging.format)
    if args.command == "milter":
        return _run_milter(config, source)
    if config.worker_count > 1 and args.worker is None:
        from smtpproxy.workers import supervise

        return supervise(config, args.config)
    return _serve(ProxyServer(config, source, worker=args.worker).serve_forever(), config)


def _run_milter(config: Config, source: ConfigSource | None) -> int:
    from smtpproxy.milter.server import MilterServer

    return _serve(MilterServer(config, source).serve_forever(), config)


def _serve(main: Coroutine[Any, Any, None], config: Config) -> int:
    """Run a front end until it stops; a startup failure is exit code 1 with the reason."""
    try:
        eventloop.run(main, config.event_loop)
    except (StartupError, eventloop.EventLoopError) as exc:
        event("startup_failed", logging.ERROR, error=str(exc))
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


def _signal_reload(config: Config, path: str, pid: int | None) -> int:
    """Send SIGHUP to the running proxy; the configuration was validated by the caller."""
    if pid is None:
        if config.pid_file is None:
            print(f"smtpproxy: {path} sets no pid_file; give the process id with --pid",
                  file=sys.stderr)
            return EXIT_CONFIG
        try:
            pid = int(Path(config.pid_file).read_text().strip())
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not a process id"
            print(f"smtpproxy: cannot read pid file {config.pid_file}: {reason}; "
                  "is the proxy running with this configuration?", file=sys.stderr)
            return EXIT_RUNTIME
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"smtpproxy: no process {pid}; is the proxy running? (stale pid file?)", file=sys.stderr)
        return EXIT_RUNTIME
    except PermissionError:
        print(f"smtpproxy: not allowed to signal process {pid}; run as its user or root",
              file=sys.stderr)
        return EXIT_RUNTIME
    print(f"{path}: OK; sent SIGHUP to process {pid}. The proxy logs event=reload with the result.")
    return 0
