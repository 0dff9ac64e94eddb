"""What plugins changed, as milter modification actions the MTA applies to its copy.

The MTA keeps the message; we only tell it what to change. Rather than replaying every
recorded edit (``Message.remove_header(matching=...)`` does not record *which* fields
went), we compare the header fields and the envelope as the MTA has them with what the
plugins left, and emit the smallest set of actions that turns one into the other:

* header fields that stay in place with a new value: SMFIR_CHGHEADER (index = n-th field
  of that name, 1-based, counted among the fields the MTA sent us);
* fields that went: SMFIR_CHGHEADER with an empty value, last occurrence first so the
  indexes of the others do not move;
* new fields: SMFIR_INSHEADER at their position, or SMFIR_ADDHEADER at the end;
* envelope: SMFIR_CHGFROM, SMFIR_DELRCPT, SMFIR_ADDRCPT(_PAR); body: SMFIR_REPLBODY chunks.

Postfix hides its own ``Received:`` field from milters but counts it for insert
positions (SMFIR_INSHEADER index 0 is above it, 1 below it); ``hidden_top`` models that
so that headers a plugin placed after an existing field land exactly there.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence

from smtpproxy.addresses import Address
from smtpproxy.milter.codec import (
    MAX_BODY_CHUNK,
    AddHeader,
    AddRecipient,
    ChangeFrom,
    ChangeHeader,
    DeleteRecipient,
    InsertHeader,
    ReplaceBody,
    Response,
)
from smtpproxy.session import Envelope

__all__ = ["body_edits", "envelope_edits", "header_edits", "split_fields"]

CRLF = b"\r\n"


def split_fields(header_block: bytes) -> list[bytes]:
    """Cut a header block (CRLF line ends, no blank line) into whole fields with their folds."""
    fields: list[bytes] = []
    start = 0
    pos = 0
    while pos < len(header_block):
        eol = header_block.find(CRLF, pos)
        end = len(header_block) if eol == -1 else eol + 2
        if pos > start and header_block[pos : pos + 1] not in (b" ", b"\t"):
            fields.append(header_block[start:pos])
            start = pos
        pos = end
    if pos > start:
        fields.append(header_block[start:pos])
    return fields


def _name(raw: bytes) -> str:
    return raw[: raw.index(b":")].decode("ascii", "surrogateescape")


def _key(raw: bytes) -> str:
    return _name(raw).lower()


def _value(raw: bytes, leading_space: bool) -> str:
    """The field's value as the milter protocol carries it (folds as ``\\n``)."""
    value = raw[raw.index(b":") + 1 :]
    if value.endswith(CRLF):
        value = value[:-2]
    value = value.replace(CRLF, b"\n")
    if not leading_space and value.startswith(b" "):
        value = value[1:]  # the MTA puts back the one space after the colon
    return value.decode("utf-8", "surrogateescape")


def header_edits(
    original: Sequence[bytes], final: Sequence[bytes], *, leading_space: bool, hidden_top: bool
) -> list[Response]:
    """Actions that turn the fields ``original`` (as the MTA sent them) into ``final``.

    ``leading_space``: SMFIP_HDR_LEADSPC was negotiated, values carry their own leading
    whitespace. ``hidden_top``: the MTA has one field above these that we never saw.
    """
    changed, deleted, kept_final = _only_added(original, final) or _compared(original, final)

    def occurrence(i: int) -> int:
        key = _key(original[i])
        return 1 + sum(1 for raw in original[:i] if _key(raw) == key)

    actions: list[Response] = []
    for i, j in sorted(changed.items()):
        value = _value(final[j], leading_space) or " "  # empty would mean "delete"
        actions.append(ChangeHeader(occurrence(i), _name(original[i]), value))
    for i in sorted(deleted, key=lambda i: (_key(original[i]), -occurrence(i))):
        actions.append(ChangeHeader(occurrence(i), _name(original[i]), ""))

    # Inserts, top to bottom, against a model of the MTA's list after the changes above:
    # the kept fields, plus the hidden one just above the first kept field (new fields
    # put before every original one go above it, at the very top, like trace fields).
    target: list[int | None] = list(range(len(final)))  # None marks the hidden field
    if hidden_top:
        first_kept = min(kept_final, default=len(final))
        target.insert(first_kept, None)
    current = len(kept_final) + hidden_top  # the entries of target the MTA's list already has
    for position, entry in enumerate(target):
        if entry is None or entry in kept_final:
            continue
        name, value = _name(final[entry]), _value(final[entry], leading_space)
        if position >= current:
            actions.append(AddHeader(name, value))
        else:
            actions.append(InsertHeader(position, name, value))
        current += 1
    return actions


_Diff = tuple[dict[int, int], list[int], set[int]]
"""(original index -> final index of a field changed in place, original indexes deleted,
final indexes that are original fields)."""


def _only_added(original: Sequence[bytes], final: Sequence[bytes]) -> _Diff | None:
    """The diff when plugins only added fields above and below the original ones, none of
    them equal to an original field (Authentication-Results, X-Spam-*: nearly every message),
    found by two comparisons; None otherwise. :func:`_compared` gives the same for these,
    by a sequence diff that costs the milter more than the rest of the edits."""
    n = len(original)
    for top in range(len(final) - n + 1) if len(final) >= n else ():
        if final[top : top + n] == original:
            added = set(final[:top]) | set(final[top + n :])
            if added.isdisjoint(original):
                return {}, [], set(range(top, top + n))
            return None
    return None


def _compared(original: Sequence[bytes], final: Sequence[bytes]) -> _Diff:
    """The diff by difflib: same-named fields in the same place are changed in place."""
    matcher = difflib.SequenceMatcher(None, list(original), list(final), autojunk=False)
    changed: dict[int, int] = {}  # original index -> final index, same field name, new value
    deleted: list[int] = []
    kept_final: set[int] = set()  # final indexes that are original fields (maybe changed)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            kept_final.update(range(j1, j2))
            continue
        paired: set[int] = set()
        if tag == "replace":  # same-named fields in the same order: changed in place
            start = i1
            for j in range(j1, j2):
                for i in range(start, i2):
                    if _key(original[i]) == _key(final[j]):
                        changed[i] = j
                        kept_final.add(j)
                        paired.add(i)
                        start = i + 1
                        break
        deleted.extend(i for i in range(i1, i2) if i not in paired)
    return changed, deleted, kept_final


def body_edits(body: bytes) -> list[Response]:
    """SMFIR_REPLBODY chunks for a new body (one empty chunk for an empty body)."""
    if not body:
        return [ReplaceBody(b"")]
    return [ReplaceBody(body[i : i + MAX_BODY_CHUNK]) for i in range(0, len(body), MAX_BODY_CHUNK)]


def _esmtp_args(params: Mapping[str, str | None]) -> str:
    return " ".join(key if value is None else f"{key}={value}" for key, value in params.items())


def envelope_edits(
    sender: Address, recipients: Sequence[Address], envelope: Envelope, *, with_params: bool
) -> list[Response]:
    """Actions that turn the MTA's envelope (``sender``, ``recipients``) into ``envelope``.

    ``with_params``: the MTA allows SMFIR_ADDRCPT_PAR, so added recipients keep their
    ESMTP parameters (NOTIFY, ORCPT).
    """
    actions: list[Response] = []
    if envelope.sender != sender:
        actions.append(ChangeFrom(f"<{envelope.sender.text}>"))
    final = [r.address for r in envelope.recipients]
    for address in dict.fromkeys(recipients):
        if address not in final:
            actions.append(DeleteRecipient(f"<{address.text}>"))
    known = set(recipients)
    for rcpt in envelope.recipients:
        if rcpt.address in known:
            continue
        known.add(rcpt.address)
        args = _esmtp_args(rcpt.params) if with_params and rcpt.params else None
        actions.append(AddRecipient(f"<{rcpt.address.text}>", args))
    return actions
