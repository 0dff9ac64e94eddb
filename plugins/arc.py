"""arc: verify the ARC chain (RFC 8617) at ``data`` and, optionally, add this hop's ARC set.

    plugins:
      - name: arc                  # verifies: before dmarc and auth_results, which read its result
      - name: dmarc
      - name: auth_results
      - name: arc_seal             # seals: after auth_results, whose header it seals
        use: arc
        settings:
          verify: false
          seal: {domain: example.com, selector: arc2024, key_file: keys/arc.pem,
                 authserv_id: mx.example.com}

**Verifying.** The chain's result is recorded as an :class:`~smtpproxy.authresults.AuthCheck`
``arc`` with ``pass``, ``fail`` or ``none`` (RFC 8617 has no other results) and the properties
``header.oldest-pass`` (on pass: 0 when every ARC-Message-Signature still verifies, else the
oldest instance from which on they all do) and ``smtp.remote-ip``. The plugin never refuses
mail: ARC is input for DMARC and local policy. Keys are looked up through the shared resolver
before dkimpy runs in ``run_blocking`` (as in ``dkim_verify``); a key lookup that fails
temporarily makes the chain ``fail`` with a reason saying so, and such a message is not sealed.

**Sealing.** With ``seal`` set, every message gets an ARC set (ARC-Seal,
ARC-Message-Signature, ARC-Authentication-Results) for ``seal.domain``. The
ARC-Authentication-Results copies the Authentication-Results header(s) whose authserv-id is
``seal.authserv_id``, so the sealing entry must come after ``auth_results`` in the plugin list;
without such a header the message is not sealed (logged). The chain validation status ``cv=``
comes from that header's ``arc=`` result, or, when it has none, from this plugin's own
verification (a single ``arc`` entry after ``auth_results`` both verifies and seals, but then
the Authentication-Results header itself lacks the arc result: use two entries as above).
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import dkim
from pydantic import Field, field_validator

from smtpproxy import (
    AuthCheck,
    EventLog,
    Message,
    PluginSettings,
    Session,
    SettingsError,
    Transaction,
    Verdict,
    hookimpl,
    run_blocking,
)
from smtpproxy import record_auth_check as record

from .auth_results import valid_authserv_id
from .dkim import (
    DKIMPY_LOG,
    KeyLocation,
    KeyLookup,
    KeySource,
    fetch_keys,
    header_from_dkimpy,
    load_private_key,
    signature_key_name,
)

__all__ = ["ARC", "ARCOutcome", "ARCSealSettings"]

log = EventLog(__name__)

ARC_FIELDS = ("arc-seal", "arc-message-signature", "arc-authentication-results")
MAX_INSTANCE = 50  # RFC 8617 4.2.1: i= is 1 to 50
_NOTE = "arc"
_AR = "Authentication-Results"
_HAS_ARC_RESULT = re.compile(r";\s*arc\s*=", re.IGNORECASE)
_INSTANCE = re.compile(r"(?:^|;)\s*i\s*=\s*(\d+)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class ARCOutcome:
    """The chain's verification result, kept in ``transaction.notes["arc"]``."""

    result: Literal["pass", "fail", "none"]
    reason: str = ""
    oldest_pass: int | None = None
    instances: int = 0
    sealers: tuple[str, ...] = ()
    """The ARC-Seal d= of each instance, oldest first."""
    temporary: bool = False
    """A key lookup failed temporarily: the fail may be a pass later."""
    properties: dict[str, str] = field(default_factory=dict)


def _arc_blocking(raw: bytes, lookups: MutableMapping[str, KeyLookup], min_key_bits: int,
                  ) -> tuple[bytes | None, list[dict[str, Any]], str, list[str]]:
    """dkimpy's ARC verification in a worker thread: (cv, per-instance data, reason, temp failures)."""
    source = KeySource(lookups)
    try:
        verifier = dkim.ARC(raw, logger=DKIMPY_LOG, minkey=min_key_bits)
        cv, data, reason = verifier.verify(dnsfunc=source)
    except dkim.DKIMException as exc:
        cv, data, reason = dkim.CV_Fail, [], str(exc) or type(exc).__name__
    except Exception as exc:  # dkimpy on hostile input: a result, never a crash
        log.info("arc_unprocessable", error=f"{type(exc).__name__}: {exc}")
        cv, data, reason = dkim.CV_Fail, [], f"ARC chain could not be processed ({type(exc).__name__})"
    return cv, list(data), str(reason), source.temporary_failures()


def _oldest_pass(data: list[dict[str, Any]]) -> int:
    """0 if every AMS verifies, else the oldest instance from which on all of them do."""
    oldest = 0
    for entry in sorted(data, key=lambda e: -int(e["instance"])):
        if not entry.get("ams-valid"):
            break
        oldest = int(entry["instance"])
    return 0 if oldest == 1 else oldest


def _authserv_id(value: str) -> str:
    head = value.split(";", 1)[0].strip()
    return head.split()[0].lower() if head else ""


class ARCSealSettings(KeyLocation):
    """Where and how this hop seals (``arc`` plugin, ``seal:``)."""

    domain: str = Field(description="Sealing domain (d= of ARC-Seal and ARC-Message-Signature).")
    key_file: Path = Field(
        description="RSA private key (PEM, PKCS#1 or PKCS#8), read at startup; relative to the config file."
    )
    authserv_id: str = Field(
        description=(
            "The authserv-id of this host's Authentication-Results header (as auth_results writes "
            "it): its results are copied into ARC-Authentication-Results."
        )
    )

    @field_validator("authserv_id")
    @classmethod
    def _authserv(cls, value: str) -> str:
        return valid_authserv_id(value.strip())


class ARC:
    """Verify ARC chains at ``data``; optionally seal (then place it after ``auth_results``)."""

    class Settings(PluginSettings):
        verify: bool = Field(
            default=True, strict=True,
            description="Verify the chain and record the arc result (turn off for a seal-only entry).",
        )
        seal: ARCSealSettings | None = Field(
            default=None,
            description=(
                "Add an ARC set to every message: {domain, selector, key_file, authserv_id}. "
                "Requires an Authentication-Results header from authserv_id (put it after auth_results)."
            ),
        )
        min_key_bits: int = Field(
            default=1024, strict=True, ge=1024, le=16384,
            description="Shortest RSA key accepted in the chain (RFC 8301).",
        )

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or self.Settings()
        seal = self.settings.seal
        try:
            self.seal_key = load_private_key(seal.key_file, "rsa-sha256") if seal is not None else None
        except ValueError as exc:
            raise SettingsError(str(exc), key=("seal", "key_file")) from None

    # -- verifying ---------------------------------------------------------------------

    async def verify(self, message: Message, remote_ip: str | None = None) -> ARCOutcome:
        """Verify the message's ARC chain."""
        fields = [(name.lower(), value) for name, value in message.headers if name.lower() in ARC_FIELDS]
        props = {"smtp.remote-ip": remote_ip} if remote_ip else {}
        if not fields:
            return ARCOutcome("none", "message has no ARC header fields", properties=props)
        instances = [int(m.group(1)) for _, v in fields if (m := _INSTANCE.search(v))]
        if any(i < 1 or i > MAX_INSTANCE for i in instances) or len(fields) > 3 * MAX_INSTANCE:
            return ARCOutcome("fail", f"more than {MAX_INSTANCE} ARC sets", properties=props)
        names = [signature_key_name(v) for name, v in fields if name != "arc-authentication-results"]
        lookups = await fetch_keys(n for n in names if n is not None)
        cv, data, reason, temporary = await run_blocking(
            _arc_blocking, message.raw, lookups, self.settings.min_key_bits
        )
        sealers = tuple(
            entry.get("as-domain", b"").decode("ascii", "replace")
            for entry in sorted(data, key=lambda e: int(e["instance"]))
        )
        count = max(instances, default=0)
        if cv == dkim.CV_Pass:
            oldest = _oldest_pass(data)
            return ARCOutcome("pass", f"{count} ARC set(s) sealed by {', '.join(sealers)}", oldest,
                              count, sealers, properties={"header.oldest-pass": str(oldest), **props})
        if cv == dkim.CV_None:
            reason = "ARC header fields without a valid instance tag (i=)"
        elif cv is None:  # dkimpy: a seal says cv=fail, the chain ended earlier
            reason = reason or "an ARC-Seal reported cv=fail"
        if temporary:
            reason += f"; key lookup failed temporarily ({temporary[0]})"
        return ARCOutcome("fail", reason, None, count, sealers, bool(temporary), props)

    @hookimpl
    async def data(self, session: Session, transaction: Transaction, message: Message) -> Verdict | None:
        outcome: ARCOutcome | None = None
        if self.settings.verify:
            outcome = await self.verify(message, session.client.ip)
            transaction.notes[_NOTE] = outcome
            record(transaction, AuthCheck("arc", outcome.result, outcome.reason, dict(outcome.properties)))
            log.info("arc", result=outcome.result, instances=outcome.instances, reason=outcome.reason)
        verdicts = [Verdict.cont(reason=f"arc={outcome.result} ({outcome.reason})",
                                 tags=(f"arc:{outcome.result}",))] if outcome else []
        if self.settings.seal is not None:
            verdicts.append(await self._seal(session, transaction, message, outcome))
        if not verdicts:
            return None
        if len(verdicts) == 1:
            return verdicts[0]
        return Verdict.cont(reason="; ".join(v.reason for v in verdicts),
                            tags=tuple(t for v in verdicts for t in v.tags))

    # -- sealing -----------------------------------------------------------------------

    async def _seal(self, session: Session, transaction: Transaction, message: Message,
                    outcome: ARCOutcome | None) -> Verdict:
        seal = self.settings.seal
        assert seal is not None and self.seal_key is not None
        ours = [v for v in message.get_all(_AR) if _authserv_id(v) == seal.authserv_id.lower()]
        if not ours:
            log.warning("arc_not_sealed", reason=f"no {_AR} header from {seal.authserv_id}",
                        note="place the sealing arc entry after auth_results, with the same authserv-id")
            return Verdict.cont(reason=f"not ARC sealed: no {_AR} from {seal.authserv_id}",
                                tags=("arc:not-sealed",))
        if outcome is None:
            known = transaction.notes.get(_NOTE)
            outcome = known if isinstance(known, ARCOutcome) else await self.verify(message)
        if outcome.temporary:
            log.warning("arc_not_sealed", reason=f"the chain could not be verified now ({outcome.reason})")
            return Verdict.cont(reason="not ARC sealed: chain verification failed temporarily",
                                tags=("arc:not-sealed",))
        # dkimpy seals from the Authentication-Results fields with exactly our authserv-id; it
        # signs neither them nor anything else this copy changes, so the set fits `message`.
        copy = Message(message.raw)
        copy.remove_header(_AR)
        for value in ours:
            head, sep, rest = value.partition(";")
            copy.add_header(_AR, seal.authserv_id + head.strip()[len(_authserv_id(value)):] + sep + rest)
        if not any(_HAS_ARC_RESULT.search(v) for v in ours):
            copy.add_header(_AR, f"{seal.authserv_id}; arc={outcome.result}")
        try:
            fields = await run_blocking(
                _seal_blocking, copy.raw, seal.selector, seal.domain, self.seal_key, seal.authserv_id
            )
        except (dkim.DKIMException, ValueError) as exc:
            log.warning("arc_not_sealed", reason=f"sealing failed: {exc}")
            return Verdict.cont(reason=f"not ARC sealed: {exc}", tags=("arc:not-sealed",))
        if not fields:
            log.warning("arc_not_sealed", reason="dkimpy found no chain status to seal")
            return Verdict.cont(reason="not ARC sealed: no chain status", tags=("arc:not-sealed",))
        for name, value in reversed(fields):  # ARC-Seal ends up on top
            message.add_header(name, value)
        instance = _INSTANCE.search(fields[0][1])
        number = instance.group(1) if instance else "?"
        log.info("arc_seal", i=number, d=seal.domain, cv=outcome.result)
        return Verdict.cont(reason=f"ARC sealed i={number} d={seal.domain} cv={outcome.result}",
                            tags=("arc:sealed",))


def _seal_blocking(raw: bytes, selector: str, domain: str, key: bytes, authserv_id: str,
                   ) -> list[tuple[str, str]]:
    signer = dkim.ARC(raw, logger=DKIMPY_LOG, signature_algorithm=b"rsa-sha256")
    lines = signer.sign(selector.encode(), domain.encode(), key, authserv_id.encode())
    return [header_from_dkimpy(line) for line in lines]
