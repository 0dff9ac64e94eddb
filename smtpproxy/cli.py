"""The ``smtpproxy`` command: run, milter, check-config, reload, plugins, quarantine, history,
digest, web, test-message.

Exit codes: 0 success, 1 runtime failure (cannot listen, a plugin failed to start),
2 configuration error (the message names file, line and key).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from smtpproxy import __version__, collector, eventloop
from smtpproxy.config import Config, ConfigError, ConfigSource, load_config
from smtpproxy.eventlog import configure_logging
from smtpproxy.registry import build_chain, installed_plugins
from smtpproxy.server import ProxyServer
from smtpproxy.startup import StartupError, cannot_start
from smtpproxy.store_cli import add_search_options
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
    policy = sub.add_parser(
        "policy", help="serve the plugin chain to Postfix as an SMTP access policy service"
    )
    policy.add_argument("-c", "--config", help="YAML configuration file (policy: section)")
    check = sub.add_parser("check-config", help="validate a configuration and its plugins")
    check.add_argument("-c", "--config", required=True, help="YAML configuration file")
    sub.add_parser("plugins", help="list installed plugins and the hooks each implements")
    quarantine = sub.add_parser(
        "quarantine", help="list, show, release, delete, purge, import or report quarantined messages",
        description="Options and ids may come in any order. The plugins are not loaded. "
        "Filters, --recipient, --allow-sender, purge, import and report need a configured store "
        "(report loads the plugins, for their learn hook).",
    )
    actions = quarantine.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("list", "list (and search) the quarantined messages"),
                         ("show", "print one message's record and headers"),
                         ("release", "deliver messages upstream and remove them from the quarantine"),
                         ("delete", "remove messages from the quarantine"),
                         ("purge", "remove the messages whose retention ran out (the proxy does it too)"),
                         ("import", "move a quarantine directory (default quarantine.path) into the store"),
                         ("report", "report messages as spam or not spam: the plugins that learn (rspamd, "
                                    "spamd) are taught")):
        one = actions.add_parser(action, help=text)
        if action not in ("list", "purge"):
            one.add_argument("ids", nargs="*", metavar="DIR" if action == "import" else "ID",
                             help="the directory" if action == "import" else "quarantine id(s)")
        if action == "list":
            add_search_options(one, history=False)
            one.add_argument("--all", action="store_true", help="released ones too")
        if action in ("release", "report"):
            one.add_argument("--recipient", action="append",
                             help="release for this recipient only (repeatable); the others stay held")
        if action == "release":
            one.add_argument("--allow-sender", action="store_true",
                             help="also add the message's From: address to each released recipient's allow "
                                  "list (the lists plugin's allow table; it must be a file or redis table)")
        if action == "report":
            verdict = one.add_mutually_exclusive_group(required=True)
            verdict.add_argument("--spam", dest="verdict", action="store_const", const="spam",
                                 help="it is spam")
            verdict.add_argument("--ham", dest="verdict", action="store_const", const="ham",
                                 help="it is not spam")
            one.add_argument("--release", action="store_true",
                             help="with --ham: release it too (for --recipient, or every one held)")
        one.add_argument("-c", "--config", help="YAML configuration file (default: the embedded one, "
                         "whose store is ./smtpproxy.db)")
    history = sub.add_parser(
        "history", help="search or export the message history, or erase one person's entries",
        description="Needs a configured store. The plugins are not loaded.",
    )
    history_actions = history.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("search", "decisions matching the filters, newest first"),
                         ("export", "the same as JSON lines (for a message: --message-id)")):
        one = history_actions.add_parser(action, help=text)
        add_search_options(one, history=True)
        one.add_argument("-c", "--config", help="YAML configuration file (default: the embedded one, "
                         "whose store is ./smtpproxy.db)")
    erase = history_actions.add_parser(
        "erase", help="remove every history entry and quarantined message naming ADDRESS (privacy request)")
    erase.add_argument("address", metavar="ADDRESS", help="the sender or recipient address, exactly")
    erase.add_argument("-c", "--config", help="YAML configuration file (default: the embedded one)")
    digest = sub.add_parser(
        "digest", help="mail each recipient a summary of their quarantined messages, with release links",
        description="Exit codes: 0 every digest sent, 1 one failed or the store is unreachable, "
        "2 not configured (store, digest.base_url, digest.keys, digest.domains).",
    )
    digest.add_argument("-c", "--config", required=True, help="YAML configuration file")
    digest.add_argument("--dry-run", action="store_true", help="print the digests instead of sending them")
    web = sub.add_parser("web", help="serve the release-link pages and, with console.users, the web console "
                                       "(digest.address, digest.port)")
    web.add_argument("-c", "--config", required=True, help="YAML configuration file")
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
        build_chain(config.plugins, source, plugin_paths=config.plugin_paths, table_names=config.tables,
                    policies=config.policies)
    return config, source


def _store_only(args: argparse.Namespace) -> bool:
    """Whether a quarantine command uses options only the store's quarantine has."""
    filters = ("sender", "recipient", "since", "until", "node", "subject", "reason", "message_id",
               "decided_by", "all", "allow_sender")
    return any(getattr(args, name, None) for name in filters)


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
    """The ``smtpproxy`` command. A listing piped into a reader that stops early
    (``smtpproxy plugins | head``) ends quietly with status 1, as Python's signal docs
    advise, instead of a BrokenPipeError traceback."""
    try:
        code = _command(argv)
        sys.stdout.flush()  # inside the try: a failure at exit would escape it
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush
        return EXIT_RUNTIME
    return code


def _command(argv: Sequence[str] | None) -> int:
    args = _parse(argv)
    if args.command == "plugins":
        return _list_plugins()
    try:
        # The quarantine commands never run plugins, so they work where those cannot be imported.
        config, source = _load(args.config, plugins=args.command not in (
            "quarantine", "history", "digest", "web", "tables"))
    except ConfigError as exc:
        print(f"smtpproxy: configuration error:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command in ("quarantine", "history"):
        from smtpproxy import store_cli

        missing = _embedded_store_missing(args, config)
        if missing is not None:
            print(f"smtpproxy: {missing}", file=sys.stderr)
            return 1
        if config.store.configured:
            if args.command == "history":
                return store_cli.history_command(config, args)
            return store_cli.quarantine_command(config, args)
        if args.command == "history" or args.action in ("purge", "import", "report") or _store_only(args):
            print(f"smtpproxy: {args.config} configures no store (store.sqlite or store.postgresql); "
                  f"`{args.command} {args.action}` with these options needs one", file=sys.stderr)
            return EXIT_CONFIG
        from smtpproxy.quarantine_cli import admin_command

        return admin_command(config, args.action, getattr(args, "ids", []))
    if args.command == "digest":
        from smtpproxy.digest import digest_command

        return digest_command(config, dry_run=args.dry_run)
    if args.command == "web":
        from smtpproxy.web.serve import web_command

        configure_logging(config.logging.level, config.logging.format, config.logging.accepted_commands)
        return web_command(config)
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
        if "policy" in config.model_fields_set and (problem := _policy_problem(config, source)):
            return problem
        for warning in _shut_out_warnings(config):
            print(f"smtpproxy: warning: {warning}", file=sys.stderr)
        groups = f", policy groups: {', '.join(g.name for g in config.policies)}" if config.policies else ""
        print(f"{args.config}: OK ({len(config.listeners)} listener(s), "
              f"delivery {config.delivery.type}, plugins: {plugins}{groups})")
        return 0
    configure_logging(config.logging.level, config.logging.format, config.logging.accepted_commands)
    if args.command == "milter":
        return _run_milter(config, source)
    if args.command == "policy":
        return _run_policy(config, source)
    if args.config is None and (unwritable := embedded_default_problem(config)):
        cannot_start(unwritable)
        return EXIT_RUNTIME
    if config.worker_count > 1 and args.worker is None:
        from smtpproxy.workers import supervise

        return supervise(config, args.config)
    return _serve(ProxyServer(config, source, worker=args.worker).serve_forever(), config)


def _shut_out_warnings(config: Config) -> list[str]:
    """check-config's word on a milter, policy service or metrics endpoint that listens
    beyond this host while its ``clients`` let only this host in (each also logs it at start)."""
    from smtpproxy.config.listen import parse_listen
    from smtpproxy.networks import shut_out_warning

    milter, policy = parse_listen(config.milter.listen), parse_listen(config.policy.listen)
    found = [shut_out_warning("milter", config.milter.listen, milter.host, config.milter.clients),
             shut_out_warning("policy", config.policy.listen, policy.host, config.policy.clients)]
    if config.metrics.enabled:
        m = config.metrics
        found.append(shut_out_warning("metrics", f"{m.address}:{m.port}", m.address, m.clients))
    return [warning for warning in found if warning]


def _embedded_store_missing(args: argparse.Namespace, config: Config) -> str | None:
    """Without -c the store commands read the embedded default's ./smtpproxy.db; where there
    is none, opening it would create an empty one and answer as if nothing were kept. Only
    ``quarantine import`` (which fills a store) may start one."""
    if args.config is not None or getattr(args, "action", None) == "import" or config.store.sqlite is None:
        return None
    if config.store.sqlite.exists():
        return None
    return (f"no store here: {config.store.sqlite} does not exist (the embedded default keeps it in "
            "the directory `smtpproxy run` ran in); run this there, or pass -c with your configuration")


def embedded_default_problem(config: Config) -> str | None:
    """Why the embedded default cannot keep its Maildir and store in the current directory
    (it writes ./mail and ./smtpproxy.db there), or None: said before anything starts."""
    store = config.store.sqlite
    assert store is not None
    try:
        with open(store, "ab"):  # created empty if missing: SQLite takes it as a new database
            pass
    except OSError as exc:
        return (f"the embedded default keeps its store in {store}, but {exc.strerror or exc}; run "
                "smtpproxy from a directory you can write to (e.g. your home), or give a "
                "configuration file with -c")
    return None


def _run_milter(config: Config, source: ConfigSource | None) -> int:
    from smtpproxy.milter.server import MilterServer

    return _serve(MilterServer(config, source).serve_forever(), config)


def _policy_problem(config: Config, source: ConfigSource | None) -> int:
    """check-config of a file with a ``policy:`` section: name the plugins that need the
    message (Postfix's policy protocol has none); with ``message_plugins: refuse`` a plugin
    that decides only on the message fails the check."""
    from smtpproxy.policy.applicability import message_plugins

    found = message_plugins(build_chain(config.plugins, source, plugin_paths=config.plugin_paths,
                                        table_names=config.tables, policies=config.policies))
    if not found:
        return 0
    refuse = config.policy.message_plugins == "refuse" and bool(found.only_message)
    print(f"smtpproxy: policy: {'error' if refuse else 'warning'}: {found.describe()} "
          f"(policy.message_plugins: {config.policy.message_plugins})", file=sys.stderr)
    return EXIT_CONFIG if refuse else 0


def _run_policy(config: Config, source: ConfigSource | None) -> int:
    from smtpproxy.policy.server import PolicyServer

    return _serve(PolicyServer(config, source).serve_forever(), config)


def _serve(main: Coroutine[Any, Any, None], config: Config) -> int:
    """Run a front end until it stops; a startup failure is exit code 1 with the reason."""
    collector.set_for_serving()
    try:
        eventloop.run(main, config.event_loop)
    except (StartupError, eventloop.EventLoopError) as exc:
        cannot_start(exc)
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
