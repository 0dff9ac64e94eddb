"""Deprecated aliases: a public name that was renamed keeps working, with a warning, for the
time docs/compatibility.md promises, then goes.

Two forms:

- a module's old names: ``__getattr__ = deprecated_names(__name__, {"Old": Renamed("New",
  since="0.2.0", removed_in="0.4.0")})`` at the end of the module (PEP 562). ``module.Old``
  and ``from module import Old`` give ``New`` and warn.
- a class's old attribute: ``old = DeprecatedAlias("new", since=..., removed_in=...)`` in the
  class body; reading ``obj.old`` or ``Class.old`` gives ``new`` and warns.

The warning is a :class:`DeprecationWarning` naming the old and the new name, the version
that deprecated it and the first version without it, attributed to the caller's line.
Every alias is listed in CHANGELOG.md under "Deprecated" (tests/unit/test_compatibility.py).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["DeprecatedAlias", "Renamed", "deprecated_names"]


@dataclass(frozen=True, slots=True)
class Renamed:
    """An old name's replacement, the version that deprecated it and the one that drops it."""

    new: str
    since: str
    removed_in: str

    def message(self, old: str, owner: str) -> str:
        return (f"{owner}.{old} is deprecated since smtpproxy {self.since} and will be removed in "
                f"{self.removed_in}; use {owner}.{self.new}")


def deprecated_names(module_name: str, renamed: Mapping[str, Renamed]) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving each old name in ``renamed`` as its new one, with a
    DeprecationWarning; any other missing name raises AttributeError as usual."""

    def __getattr__(name: str) -> Any:
        entry = renamed.get(name)
        if entry is None:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        warnings.warn(entry.message(name, module_name), DeprecationWarning, stacklevel=2)
        return getattr(sys.modules[module_name], entry.new)

    return __getattr__


class DeprecatedAlias:
    """A class attribute that reads (and, on instances, writes) another one, with a warning."""

    def __init__(self, new: str, *, since: str, removed_in: str) -> None:
        self.renamed = Renamed(new, since, removed_in)
        self.old = ""
        self.owner = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.old = name
        self.owner = f"{owner.__module__}.{owner.__qualname__}"

    def __get__(self, obj: object, objtype: type | None = None) -> Any:
        warnings.warn(self.renamed.message(self.old, self.owner), DeprecationWarning, stacklevel=2)
        return getattr(obj if obj is not None else objtype, self.renamed.new)

    def __set__(self, obj: object, value: Any) -> None:
        warnings.warn(self.renamed.message(self.old, self.owner), DeprecationWarning, stacklevel=2)
        setattr(obj, self.renamed.new, value)
