"""lists: per-recipient allow and block lists from lookup tables (docs/plugins/lists.md).

    tables:
      allow: {type: redis, url: "redis://127.0.0.1:6379/0", prefix: "allow:", structure: set}
      block: {type: file, file: blocklists}
    plugins:
      - name: spf
      - name: dkim_verify
      - name: dmarc
      - name: clamav
      - name: lists                 # after the authentication checks and the virus scan
        settings: {allow: allow, block: block}
      - name: score

Each table is keyed by recipient, in Postfix's order (``user+tag@domain``, ``user@domain``,
``@domain``, ``domain``, ``.parent``): every key found adds its entries, so a user's list and
the domain's both apply. An entry is an address (``friend@partner.test``), a domain
(``partner.test`` or ``@partner.test``) or a domain's subdomains (``*.partner.test``); a
value may hold several, separated by commas or spaces.

- A **block** entry matching the envelope sender refuses that recipient at RCPT TO
  (``550 5.7.1``); the others of the transaction are not affected.
- An **allow** entry counts only when the sender is *authenticated* for it, because an
  allow list the sender can forge is the first thing spammers use: it is matched against the
  ``From:`` address (what the reader sees), and that address's domain must have passed
  DMARC (aligned SPF or DKIM as the domain publishes) or, without a dmarc plugin, SPF for
  ``smtp.mailfrom`` or DKIM for ``header.d`` in exactly that domain. It must hold for every
  recipient of the transaction. Then the allow adds ``allow_score`` (-20) and the tag
  ``lists:allow`` to the transaction (the score plugin's totals and rules see them), or with
  ``allow_action: accept`` ends the DATA chain there.

Precedence: a block entry refuses before any DATA check. An allow entry with the default
``allow_action: score`` never overrides a verdict of its own: a virus (clamav), a DMARC
``p=reject`` (dmarc) or an attachment rule still refuse or quarantine; only score-based
decisions move. ``allow_action: accept`` skips the plugins *after* it in the DATA chain, so
whatever is placed before it (clamav, dmarc in the example) still decides first.

A table that cannot answer tempfails (the plugin's ``on_error``), never a pass.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from smtpproxy import (
    EventLog,
    Message,
    PluginSettings,
    Recipient,
    Session,
    TableName,
    Transaction,
    Verdict,
    address_keys,
    auth_checks,
    get_table,
    hookimpl,
)

__all__ = ["Lists", "ListsSettings", "entry_matches"]

log = EventLog(__name__)
_SPLIT = re.compile(r"[,\s]+")
_FROM = re.compile(r"<([^<>@\s]+@[^<>@\s]+)>|([^\s<>,;:\"()]+@[^\s<>,;:\"()]+)")


class ListsSettings(PluginSettings):
    allow: TableName | None = Field(default=None, description="The allow table (recipient key -> senders).")
    block: TableName | None = Field(default=None, description="The block table (recipient key -> senders).")
    allow_score: float = Field(default=-20.0, allow_inf_nan=False,
                               description="Score an authenticated allow entry adds (action: score).")
    allow_action: Literal["score", "accept"] = Field(
        default="score",
        description="'score': add allow_score and the tag lists:allow; 'accept': end the DATA chain.")
    recipient_delimiter: str = Field(default="+", max_length=8,
                                     description="Characters that start an address extension.")
    block_reply: str = Field(default="Sender blocked by the recipient's block list",
                             description="The 550 5.7.1 text for a blocked recipient.")

    @model_validator(mode="after")
    def _one_table(self) -> ListsSettings:
        if self.allow is None and self.block is None:
            raise ValueError("needs 'allow' or 'block' (or both): the name of a table in tables:")
        return self


def entry_matches(entry: str, address: str) -> bool:
    """Whether a list *entry* covers *address* (both compared without regard to case)."""
    entry, address = entry.lower().rstrip("."), address.lower()
    domain = address.rpartition("@")[2]
    if entry.startswith("*."):
        return domain.endswith(entry[1:])
    if entry.startswith("@"):
        return domain == entry[1:]
    if "@" in entry:
        return address == entry
    return domain == entry


class Lists:
    """Per-recipient allow and block lists; see the module text."""

    Settings = ListsSettings

    def __init__(self, settings: ListsSettings):
        self.settings = settings

    @hookimpl
    def startup(self) -> None:
        for name in (self.settings.allow, self.settings.block):
            if name is not None:
                get_table(name)  # KeyError naming the tables there are: the start fails

    async def _entries(self, table_name: str, recipient: str) -> list[str]:
        table = get_table(table_name)
        entries: list[str] = []
        for key in address_keys(recipient, self.settings.recipient_delimiter):
            found = await table.lookup(key)
            for value in found or ():
                entries.extend(e for e in _SPLIT.split(value) if e)
        return entries

    @hookimpl
    async def rcpt_to(self, session: Session, transaction: Transaction,
                      recipient: Recipient) -> Verdict | None:
        sender = transaction.envelope.sender.text
        if self.settings.block is None or not sender:
            return None
        entries = await self._entries(self.settings.block, recipient.address.text)
        hit = next((e for e in entries if entry_matches(e, sender)), None)
        if hit is None:
            return None
        log.info("lists", list="block", recipient=recipient.address.text, sender=sender, entry=hit)
        return Verdict.reject(self.settings.block_reply, reason=f"block list entry {hit}")

    @hookimpl
    async def data(self, session: Session, transaction: Transaction, message: Message) -> Verdict | None:
        recipients = transaction.envelope.recipients
        if self.settings.allow is None or not recipients:
            return None
        author = _author(message)
        if author is None:
            return None
        hits = []
        for recipient in recipients:
            entries = await self._entries(self.settings.allow, recipient.address.text)
            hit = next((e for e in entries if entry_matches(e, author)), None)
            if hit is None:
                return None  # every recipient must allow it: one verdict serves them all
            hits.append(hit)
        domain = author.rpartition("@")[2].lower()
        how = _authenticated(transaction, domain)
        if how is None:
            log.info("lists", list="allow", result="unauthenticated", author=author, entry=hits[0],
                     note="an allow entry counts only with aligned SPF or DKIM (or DMARC pass)")
            return None
        log.info("lists", list="allow", result="allowed", author=author, entry=hits[0], by=how)
        reason = f"allow list entry {hits[0]} ({how})"
        if self.settings.allow_action == "accept":
            return Verdict.accept(reason)
        return Verdict.cont(score=self.settings.allow_score, reason=reason, tags=("lists:allow",))


def _author(message: Message) -> str | None:
    """The single From: address, or None (none, or several: no allow for ambiguous authors)."""
    values = message.get_all("From")
    if len(values) != 1:
        return None
    found = [a or b for a, b in _FROM.findall(values[0])]
    return found[0] if len(set(found)) == 1 else None


def _authenticated(transaction: Transaction, domain: str) -> str | None:
    """How *domain* (the From: domain) was authenticated: ``dmarc``, ``spf`` or ``dkim``."""
    for check in auth_checks(transaction, "dmarc"):
        if check.result == "pass" and check.properties.get("header.from", "").lower() == domain:
            return "dmarc"
    for check in auth_checks(transaction, "spf"):
        identity = check.properties.get("smtp.mailfrom", "")
        if check.result == "pass" and identity.rpartition("@")[2].lower() == domain:
            return "spf"
    for check in auth_checks(transaction, "dkim"):
        if check.result == "pass" and check.properties.get("header.d", "").lower() == domain:
            return "dkim"
    return None
