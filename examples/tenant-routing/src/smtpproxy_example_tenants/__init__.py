"""tenant_routing: each tenant's mail to its own mail server, by rewriting recipients.

A hosting provider receives mail for many customer domains on one MX. Each tenant (customer)
has its own mail server. This plugin maps a recipient's domain to a tenant and rewrites the
recipient into that tenant's internal domain, keeping the original domain in front
(``bob@acme.co.example`` → ``bob@acme.co.example.acme.tenants.internal``; the tenant's server
strips the suffix). The proxy's ``delivery.routes`` then sends each tenant's internal domain
to that tenant's upstream::

    relay:
      domains: [acme.example, acme.co.example, globex.example]
    delivery:
      type: smtp
      host: fallback.internal
      routes:
        - {domains: ["*.acme.tenants.internal"], upstreams: [{host: mx.acme.internal}]}
        - {domains: ["*.globex.tenants.internal"], upstreams: [{host: mx.globex.internal}]}
    plugins:
      - name: tenants
        use: tenant_routing
        settings:
          tenants:
            acme: [acme.example, acme.co.example]
            globex: [globex.example]

The rewrite is done at ``data`` through the envelope's edit methods, so it is recorded: the
proxy then delivers the rewritten envelope and groups recipients by route. A message for two
tenants is sent to each tenant's server, and the client hears 250 only if both accepted it.
The original domain stays in the address rather than in a header: the same message content
goes to every tenant, and a header naming one tenant's recipients would show them to the others.
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from smtpproxy import Address, PluginSettings, Transaction, Verdict, hookimpl

__all__ = ["TenantRouting"]

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


class TenantRouting:
    """Rewrite recipients of tenant domains into ``<local>@<domain>.<tenant>.<suffix>``."""

    class Settings(PluginSettings):
        tenants: dict[str, list[str]] = Field(description="Tenant name → the recipient domains it owns.")
        suffix: str = Field(default="tenants.internal", description="Tenant-internal parent domain.")

        @field_validator("tenants")
        @classmethod
        def _valid(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
            seen: dict[str, str] = {}
            for tenant, domains in value.items():
                if not _LABEL.fullmatch(tenant):
                    raise ValueError(f"tenant name {tenant!r} must be one lower-case DNS label")
                for domain in domains:
                    owner = seen.setdefault(domain.lower(), tenant)
                    if owner != tenant:
                        raise ValueError(f"domain {domain} belongs to both {owner} and {tenant}")
            return value

    def __init__(self, settings: Settings):
        self.settings = settings
        self._tenant_of = {d.lower(): t for t, ds in settings.tenants.items() for d in ds}

    def tenant_address(self, address: Address) -> Address | None:
        """The tenant-internal address for a recipient, or None when no tenant owns it.

        Raises ValueError when the result would not be a valid address (too long).
        """
        domain = address.domain.lower()
        tenant = self._tenant_of.get(domain)
        if tenant is None:
            return None
        return Address.parse(f"{address.local}@{domain}.{tenant}.{self.settings.suffix}", allow_utf8=True)

    @hookimpl
    def data(self, transaction: Transaction) -> Verdict | None:
        envelope = transaction.envelope
        rewritten = []
        for rcpt in list(envelope.recipients):
            try:
                target = self.tenant_address(rcpt.address)
            except ValueError as exc:
                return Verdict.reject(f"<{rcpt.address.text}>: cannot route to its tenant ({exc})",
                                      code=550, enhanced="5.1.3")
            if target is None:
                continue
            envelope.remove_recipient(rcpt.address)
            envelope.add_recipient(target, rcpt.params)
            rewritten.append(f"{rcpt.address.text} -> {target.domain}")
        if not rewritten:
            return None
        return Verdict.cont(reason=", ".join(rewritten))
