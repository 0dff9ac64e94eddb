"""Hook specifications: the contract between smtpproxy and its plugins.

A plugin is a class (or a module) whose methods are marked with ``@smtpproxy.hookimpl``
and named after one of the hooks below. Each hook may be ``async def`` or a plain
function, and may take any subset of the arguments listed in its signature, by name::

    from smtpproxy import Verdict, hookimpl

    class NoRoleAccounts:
        @hookimpl
        async def rcpt_to(self, session, recipient):
            if recipient.address.local.lower() in {"abuse", "noc"} and session.auth_user is None:
                return Verdict.reject("Role accounts do not take outside mail", enhanced="5.7.1")

**Order and outcome.** Hooks run one plugin at a time, in the order the ``plugins:`` list of
the configuration gives. Returning ``None`` (or nothing) lets the next plugin run. Returning
a final :class:`~smtpproxy.Verdict` (accept, reject, tempfail, discard, quarantine) stops
the phase; ``Verdict.cont(score=...)`` records a score and continues.

**Isolation.** Every call is time-boxed by the plugin's ``timeout``, and everything a hook
raises is caught (``KeyboardInterrupt``, ``SystemExit`` and its own ``CancelledError``
too). A plugin that raises, times out or returns something that is not a valid verdict
gets its ``on_error`` policy: ``tempfail`` (default: the client is told 4xx and retries) or
``continue`` (logged, chain goes on). An error never accepts a message. ``async def`` hooks
run on the event loop and must not block it (use ``await smtpproxy.run_blocking(...)``);
plain hooks run in a bounded pool of threads, so they may block, under the same timeout.

**Notifications.** ``after_message``, ``disconnect``, ``startup`` and ``shutdown`` are
notifications: every plugin that implements them runs, whatever an earlier plugin decided,
and their return value is ignored.

**Requests.** ``learn`` is not part of mail flow: an administrator or a recipient asks for
it (``smtpproxy quarantine report``, the console's "spam" / "not spam" buttons). Every plugin
that implements it runs, under the same timeout and isolation; what each returns (a short
text) or raises is shown to whoever asked, and never affects a message in flight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from smtpproxy.addresses import Address
    from smtpproxy.message import Message
    from smtpproxy.session import Decision, Recipient, Session, Transaction
    from smtpproxy.verdicts import Verdict

PROJECT = "smtpproxy"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

PHASES = ("connect", "helo", "mail_from", "rcpt_to", "data")
"""The hooks that may return a verdict, in the order a session goes through them."""
NOTIFICATIONS = ("after_message", "disconnect", "startup", "shutdown")
"""The hooks that are always called on every plugin and whose return value is ignored."""
REQUESTS = ("learn",)
"""The hooks called on request, outside mail flow: every implementer runs, and what each
returns or raises goes back to whoever asked."""
HOOKS = (*PHASES, *NOTIFICATIONS, *REQUESTS)
"""Every hook a plugin may implement, in that order."""


@hookspec
def startup() -> None:
    """Called once when the proxy starts, before it accepts connections.

    Open connection pools, load data files, warm caches here. Raising stops the proxy
    from starting, with the error in the log: better than failing on the first message.
    """


@hookspec
def shutdown() -> None:
    """Called once when the proxy stops, after the last session has ended. Close resources."""


@hookspec
def connect(session: Session) -> Verdict | None:
    """A client connected; called before the 220 greeting is sent.

    ``session.client`` holds the peer IP and port. A reject sends ``554`` and closes the
    connection; a tempfail sends ``421`` and closes. DNS blocklists and connection rate
    limits belong here. Discard or quarantine applies to every message of the session.
    """


@hookspec
def helo(session: Session, hostname: str) -> Verdict | None:
    """The client sent HELO or EHLO with ``hostname`` (also in ``session.helo`` once accepted).

    A reject or tempfail answers the HELO/EHLO command; the client must send a good one
    before MAIL.
    """


@hookspec
def mail_from(session: Session, transaction: Transaction, sender: Address) -> Verdict | None:
    """The client sent MAIL FROM; ``sender`` is the validated address (``sender.is_null`` for ``<>``).

    ``transaction.envelope.sender_params`` holds the ESMTP parameters (SIZE, BODY, ...).
    A reject or tempfail answers MAIL; the transaction is then abandoned. SPF belongs here.
    """


@hookspec
def rcpt_to(session: Session, transaction: Transaction, recipient: Recipient) -> Verdict | None:
    """The client sent RCPT TO for ``recipient``; called once per recipient.

    A reject or tempfail refuses this recipient only; the others are unaffected. An accept
    adds it without asking the plugins after this one. The recipient is appended to
    ``transaction.envelope.recipients`` only once every plugin agreed.
    """


@hookspec
def data(session: Session, transaction: Transaction, message: Message) -> Verdict | None:
    """The complete message arrived (dot-unstuffed, CRLF line endings, nothing bare).

    Plugins may edit ``message`` (headers, body) and ``transaction.envelope``; the upstream
    receives the edited version. The client is told 250 only after the upstream accepted
    the message, so a tempfail here or an upstream failure makes the client retry.
    """


@hookspec
def after_message(session: Session, transaction: Transaction, decision: Decision) -> None:
    """Called after a message's fate is settled and the client has its answer.

    ``decision`` says what happened (delivered, rejected, tempfailed, discarded,
    quarantined), the reply the client got, and who decided. For logging, statistics and
    learning (e.g. Bayesian training); always called, whatever an earlier plugin decided.
    """


@hookspec
def disconnect(session: Session) -> None:
    """The connection closed, for whatever reason. Always called, once per session."""


@hookspec
def learn(message: Message, verdict: str, reporter: str,
          recipients: list[str]) -> str | None:
    """Someone reported ``message`` as ``"spam"`` or ``"ham"`` (not spam): feed it to your engine.

    ``reporter`` says who (``admin:alice``, ``recipient:bob@example.com``, ``cli``) and
    ``recipients`` for whom the message was held. A bridge to a learning filter teaches its
    engine here (rspamd's controller ``/learnspam``, spamd's ``TELL``). Return a short text
    for the person who asked (``"rspamd learned it as spam"``); raise with a clear message
    when the engine refused or could not be reached: the error is shown to them, and the
    other plugins still learn. Plugins without an engine simply do not implement it.
    """
