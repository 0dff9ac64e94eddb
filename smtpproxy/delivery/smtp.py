"""Forwarding to an upstream MTA (Postfix, Exchange, ...) with aiosmtplib.

Transparency rules: the upstream's reply to the end of DATA (code, enhanced code, text)
is what the client gets; a refusal at MAIL, RCPT or DATA is relayed with the upstream's
code; an unreachable or silent upstream becomes ``451 4.4.x`` so the client retries.

Addresses are sent with ``execute_command`` exactly as the inbound parser validated them:
aiosmtplib's ``mail()``/``rcpt()`` would run them through ``email.utils.parseaddr``, which
silently rewrites some addresses.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import aiosmtplib

from smtpproxy.delivery import Delivered, DeliveryError
from smtpproxy.session import Session, Transaction
from smtpproxy.verdicts import Reply

__all__ = ["SmtpDelivery", "UpstreamSettings"]

_ENHANCED_PREFIX = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s+")
_UNSAFE_TEXT = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")

TlsMode = Literal["none", "opportunistic", "starttls", "implicit"]


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    host: str
    port: int = 25
    tls: TlsMode = "opportunistic"
    tls_verify: bool = True
    ca_file: Path | None = None
    tls_hostname: str | None = None
    helo_name: str = "localhost"
    connect_timeout: float = 30.0
    command_timeout: float = 60.0
    data_timeout: float = 600.0


def upstream_reply(code: int, message: str) -> Reply:
    """Turn an upstream response into a Reply, keeping its enhanced code and text."""
    text = _UNSAFE_TEXT.sub(" ", message)
    lines = text.split("\n")
    enhanced = None
    match = _ENHANCED_PREFIX.match(lines[0])
    if match and match.group(1)[0] == str(code)[0]:
        enhanced = match.group(1)
        lines = [_ENHANCED_PREFIX.sub("", line, count=1) for line in lines]
    if code == 421:
        # 421 means "I am closing"; passed through it would make the client drop *us*.
        code, enhanced = 451, enhanced and "4" + enhanced[1:]
    if not 200 <= code <= 599:
        return Reply(451, "4.4.0", f"Upstream sent an invalid reply code {code}")
    return Reply(code, enhanced, "\n".join(lines))


class SmtpDelivery:
    """One upstream host; a fresh connection per message (pooling comes with failover)."""

    name = "smtp"

    def __init__(self, settings: UpstreamSettings):
        self.settings = settings
        self._verify_context: ssl.SSLContext | None = None
        if settings.tls in ("starttls", "implicit"):
            self._verify_context = self._make_context(verify=settings.tls_verify)
        self._opportunistic_context = self._make_context(verify=False)

    def _make_context(self, *, verify: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context(
            cafile=str(self.settings.ca_file) if self.settings.ca_file else None
        )
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    @property
    def destination(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def deliver(self, session: Session, transaction: Transaction, content: bytes) -> Delivered:
        s = self.settings
        client = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            local_hostname=s.helo_name,
            timeout=s.command_timeout,
            use_tls=s.tls == "implicit",
            start_tls=False,
            tls_context=self._verify_context if s.tls == "implicit" else None,
        )
        try:
            tls = await self._open(client)
            reply = await self._transfer(client, transaction, content)
            return Delivered(reply, self.destination, tls)
        except aiosmtplib.SMTPConnectTimeoutError as exc:
            raise DeliveryError(
                Reply(451, "4.4.1", "Upstream mail server not reachable, try again later"),
                f"{self.destination}: connect timeout: {exc}",
            ) from exc
        except aiosmtplib.SMTPTimeoutError as exc:
            raise DeliveryError(
                Reply(451, "4.4.2", "Upstream mail server timed out, try again later"),
                f"{self.destination}: {exc}",
            ) from exc
        except (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPServerDisconnected, OSError) as exc:
            raise DeliveryError(
                Reply(451, "4.4.1", "Upstream mail server not reachable, try again later"),
                f"{self.destination}: {exc}",
            ) from exc
        except aiosmtplib.SMTPException as exc:
            raise DeliveryError(
                Reply(451, "4.4.0", "Upstream delivery failed, try again later"),
                f"{self.destination}: {type(exc).__name__}: {exc}",
            ) from exc
        finally:
            await _quit(client)

    async def _open(self, client: aiosmtplib.SMTP) -> str | None:
        """Connect, EHLO and apply the TLS policy. Returns the TLS version or None."""
        s = self.settings
        greeting = await client.connect(timeout=s.connect_timeout)
        if greeting.code != 220:
            raise DeliveryError(upstream_reply(_as_temp(greeting.code), greeting.message),
                                f"{self.destination}: greeting {greeting.code}")
        ehlo = await client.ehlo()
        if ehlo.code != 250:
            helo = await client.helo()
            if helo.code != 250:
                raise DeliveryError(upstream_reply(_as_temp(helo.code), helo.message),
                                    f"{self.destination}: HELO refused")
        if s.tls == "implicit":
            return _tls_version(client)
        if s.tls == "none":
            return None
        if not client.supports_extension("starttls"):
            if s.tls == "starttls":
                raise DeliveryError(
                    Reply(451, "4.7.5", "Upstream does not offer STARTTLS, which is required"),
                    f"{self.destination}: no STARTTLS; refusing to send in plaintext",
                )
            return None
        context = self._verify_context if s.tls == "starttls" else self._opportunistic_context
        try:
            response = await client.starttls(
                tls_context=context, server_hostname=s.tls_hostname or s.host
            )
        except (ssl.SSLError, aiosmtplib.SMTPException, OSError) as exc:
            raise DeliveryError(
                Reply(451, "4.7.5", "TLS with the upstream mail server failed, try again later"),
                f"{self.destination}: STARTTLS failed: {exc}",
            ) from exc
        if response.code != 220:
            raise DeliveryError(upstream_reply(_as_temp(response.code), response.message),
                                f"{self.destination}: STARTTLS refused")
        # RFC 3207 4.2: the server forgot everything; greet again (and learn the extensions
        # it offers under TLS). execute_command, which we use for MAIL, will not do it for us.
        ehlo = await client.ehlo()
        if ehlo.code != 250:
            raise DeliveryError(upstream_reply(_as_temp(ehlo.code), ehlo.message),
                                f"{self.destination}: EHLO after STARTTLS refused")
        return _tls_version(client)

    async def _transfer(
        self, client: aiosmtplib.SMTP, transaction: Transaction, content: bytes
    ) -> Reply:
        envelope = transaction.envelope
        options = []
        if client.supports_extension("size"):
            options.append(b"SIZE=%d" % len(content))
        body = envelope.sender_params.get("BODY")
        if body and client.supports_extension("8bitmime"):
            options.append(b"BODY=" + body.upper().encode("ascii"))
        if envelope.smtputf8:
            if not client.supports_extension("smtputf8"):
                raise DeliveryError(
                    Reply(550, "5.6.7", "Upstream mail server does not support SMTPUTF8"),
                    f"{self.destination}: no SMTPUTF8",
                )
            options.append(b"SMTPUTF8")
        encoding = "utf-8" if envelope.smtputf8 else "ascii"
        mail = await client.execute_command(
            b"MAIL", b"FROM:<" + envelope.sender.text.encode(encoding) + b">", *options
        )
        if mail.code != 250:
            raise DeliveryError(upstream_reply(mail.code, mail.message),
                                f"{self.destination}: MAIL refused")
        refused: list[tuple[str, Reply]] = []
        for rcpt in envelope.recipients:
            response = await client.execute_command(
                b"RCPT", b"TO:<" + rcpt.address.text.encode(encoding) + b">"
            )
            if response.code not in (250, 251):
                refused.append((rcpt.address.text, upstream_reply(response.code, response.message)))
        if refused:
            await client.rset()
            raise DeliveryError(_refusal_reply(refused, len(envelope.recipients)),
                                f"{self.destination}: recipients refused: "
                                + ", ".join(f"{a} {r.code}" for a, r in refused))
        try:
            response = await client.data(content, timeout=self.settings.data_timeout)
        except aiosmtplib.SMTPDataError as exc:
            raise DeliveryError(upstream_reply(exc.code, exc.message),
                                f"{self.destination}: DATA refused") from exc
        if response.code != 250:
            raise DeliveryError(upstream_reply(response.code, response.message),
                                f"{self.destination}: DATA {response.code}")
        return upstream_reply(250, response.message)


def _refusal_reply(refused: list[tuple[str, Reply]], total: int) -> Reply:
    """One reply for a message whose recipients the upstream refused at delivery time.

    All refused and all permanently: relay the first refusal (the client bounces). Otherwise
    answer 4xx: delivering to part of the recipients after the client heard 250 for all of
    them would lose mail silently. (``rcpt_mode: relay`` avoids this by asking the upstream
    at RCPT time.)
    """
    first = refused[0][1]
    if len(refused) == total and all(r.is_permanent for _, r in refused):
        return first
    addr, reply = refused[0]
    return Reply(451, "4.5.0", f"Upstream refused recipient {addr}: {reply.code} {reply.text}"[:400])


def _as_temp(code: int) -> int:
    """An upstream that refuses us before MAIL is our problem, not the sender's: retry later."""
    return code if 400 <= code < 500 else 451


def _tls_version(client: aiosmtplib.SMTP) -> str | None:
    ssl_object = client.get_transport_info("ssl_object")
    return ssl_object.version() if ssl_object is not None else None


async def _quit(client: aiosmtplib.SMTP) -> None:
    if client.is_connected:
        try:
            await client.quit(timeout=5)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            client.close()
