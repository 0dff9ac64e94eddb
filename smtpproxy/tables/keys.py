"""Postfix's key search orders, written once: which keys a table is asked for an address.

``address_keys("User+Tag@Sub.Example.TEST")`` gives, in order and without duplicates::

    user+tag@sub.example.test   the address as it came (domain lower-cased)
    user@sub.example.test       the recipient delimiter and what follows it removed
    @sub.example.test           the whole domain (Postfix's ``@domain`` key)
    sub.example.test            the domain (access(5)'s ``domain`` key)
    .example.test               each parent domain, dot first (access(5)'s ``.domain`` key,
    .test                       which matches subdomains)

Each part can be left out (``at_domain=False``, ``domain=False``, ``parents=False``), so every
feature asks with the same rules: the sender/login map uses the first three, an allow list all.
The local part keeps its case (RFC 5321 2.4); tables fold keys to lower case themselves unless
told not to (``fold_case: false``).
"""

from __future__ import annotations

__all__ = ["address_keys", "domain_keys", "strip_extension"]


def strip_extension(local: str, delimiter: str) -> str:
    """*local* without its extension: ``user+tag`` -> ``user``, cut at the first delimiter
    character; a local part that starts with one is not split (Postfix's split_addr)."""
    cut = next((i for i, c in enumerate(local) if c in delimiter), -1)
    return local[:cut] if cut > 0 else local


def domain_keys(domain: str, *, parents: bool = True) -> list[str]:
    """``sub.example.test``, then ``.example.test``, ``.test`` (with *parents*)."""
    domain = domain.lower().rstrip(".")
    if not domain:
        return []
    keys = [domain]
    if parents:
        labels = domain.split(".")
        keys.extend("." + ".".join(labels[i:]) for i in range(1, len(labels)))
    return keys


def address_keys(address: str, delimiter: str = "+", *, at_domain: bool = True, domain: bool = True,
                 parents: bool = True) -> list[str]:
    """The keys to look *address* up by, most specific first (see the module text). An address
    without ``@`` is a bare local part: it and its unextended form only."""
    local, at, dom = address.rpartition("@")
    if not at:
        local, dom = address, ""
    dom = dom.lower().rstrip(".")
    suffix = f"@{dom}" if at else ""
    keys = [f"{local}{suffix}"]
    if delimiter:
        keys.append(f"{strip_extension(local, delimiter)}{suffix}")
    if dom:
        if at_domain:
            keys.append(f"@{dom}")
        if domain:
            keys.extend(domain_keys(dom, parents=parents))
    return list(dict.fromkeys(k for k in keys if k))
