"""SettingsError: how a plugin refuses a setting its pydantic ``Settings`` model cannot check.

Validators on the ``Settings`` model are the first way (a ``ValueError`` there is reported
at the field's file:line:key). A check that needs more than the values (the constructed
object, a compiled resource) belongs in the plugin's constructor, which ``check-config``
and startup run too; raising :class:`SettingsError` there is reported at the named key
instead of as a failure of the whole plugin entry.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["SettingsError"]


class SettingsError(ValueError):
    """A plugin setting is unusable; ``key`` is its path below ``settings:``.

    ``SettingsError("unknown placeholder {x}", key=("add", "X-Tag"))`` is reported as
    ``smtpproxy.yaml:12:9: plugins[0].settings.add.X-Tag: unknown placeholder {x}``.
    """

    def __init__(self, message: str, *, key: str | Sequence[str | int] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.key: tuple[str | int, ...] = (key,) if isinstance(key, str) else tuple(key)
