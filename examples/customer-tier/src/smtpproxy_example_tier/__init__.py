"""customer_tier: an ``X-Customer-Tier`` header from an HTTP/JSON lookup of the sender's domain.

::

    plugins:
      - name: tier
        use: customer_tier
        timeout: 5                 # the chain's own limit; keep it above the lookup's
        settings:
          url: https://crm.internal/api/tier      # GET ?domain=<sender domain>
          timeout: 0.5

The service answers ``{"tier": "gold"}`` (HTTP 200), or 404 for an unknown domain. The
lookup fails open: a slow, broken or unreachable service adds no header, records a tag
(``tier:unavailable``) and lets the message through, because a CRM outage must not stop
mail. A header the sender wrote is always removed first, so nobody can claim a tier.
"""

from __future__ import annotations

import re

import httpx
from pydantic import Field, HttpUrl

from smtpproxy import EventLog, Message, PluginSettings, Transaction, Verdict, hookimpl

__all__ = ["CustomerTier"]

log = EventLog("smtpproxy_example_tier")
_TIER = re.compile(r"[A-Za-z0-9_-]{1,32}")


class CustomerTier:
    """Look up the sender domain's tier and put it in a header; fail open."""

    class Settings(PluginSettings):
        url: HttpUrl = Field(description="Lookup endpoint; the domain is sent as ?domain=.")
        header: str = Field(default="X-Customer-Tier", min_length=1)
        timeout: float = Field(default=0.5, gt=0, le=30, description="Seconds for the whole lookup.")

    def __init__(self, settings: Settings):
        self.settings = settings
        self._client: httpx.AsyncClient | None = None

    @hookimpl
    async def startup(self) -> None:
        # One pooled client for the life of the proxy: keep-alive to the service.
        self._client = httpx.AsyncClient(timeout=self.settings.timeout)

    @hookimpl
    async def shutdown(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def lookup(self, domain: str) -> str | None:
        """The tier, or None for an unknown domain; raises httpx.HTTPError or ValueError."""
        assert self._client is not None, "startup hook not run"
        response = await self._client.get(str(self.settings.url), params={"domain": domain})
        if response.status_code == 404:
            return None
        response.raise_for_status()
        tier = response.json().get("tier")
        if not isinstance(tier, str) or not _TIER.fullmatch(tier):
            raise ValueError(f"unexpected tier value {tier!r}")
        return tier

    @hookimpl
    async def data(self, transaction: Transaction, message: Message) -> Verdict:
        message.remove_header(self.settings.header)
        domain = transaction.envelope.sender.domain
        if not domain:
            return Verdict.cont(reason="null sender: no lookup")
        try:
            tier = await self.lookup(domain.lower())
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("tier_lookup_failed", domain=domain, error=repr(exc))
            return Verdict.cont(reason=f"lookup failed: {type(exc).__name__}", tags=("tier:unavailable",))
        if tier is None:
            return Verdict.cont(reason=f"{domain}: no tier", tags=("tier:none",))
        message.add_header(self.settings.header, tier)
        return Verdict.cont(reason=f"{domain}: {tier}", tags=(f"tier:{tier}",))
