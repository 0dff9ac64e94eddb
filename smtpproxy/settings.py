"""The base of a plugin's ``Settings`` model, and how a plugin refuses a setting.

:class:`PluginSettings` forbids keys the model does not declare, so a typo in a plugin's
``settings:`` block (``scor: 5``) is an error at load time, located at file:line:key and with
the near miss suggested, instead of a setting silently left at its default.

Validators on the ``Settings`` model are the first way (a ``ValueError`` there is reported
at the field's file:line:key). A check that needs more than the values (the constructed
object, a compiled resource) belongs in the plugin's constructor, which ``check-config``
and startup run too; raising :class:`SettingsError` there is reported at the named key
instead of as a failure of the whole plugin entry.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

__all__ = ["PluginSettings", "SettingsError"]


class PluginSettings(BaseModel):
    """Base for a plugin's nested ``Settings`` model (and the models nested in it).

    Unknown keys are refused (``unknown key (did you mean 'score'?)`` at the key's file:line),
    and the validated settings are immutable (``frozen``): one settings object may be shared by
    the plugin's hooks on every session. A subclass may relax either in its own
    ``model_config``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


class SettingsError(ValueError):
    """A plugin setting is unusable; ``key`` is its path below ``settings:``.

    ``SettingsError("unknown placeholder {x}", key=("add", "X-Tag"))`` is reported as
    ``smtpproxy.yaml:12:9: plugins[0].settings.add.X-Tag: unknown placeholder {x}``.
    """

    def __init__(self, message: str, *, key: str | Sequence[str | int] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.key: tuple[str | int, ...] = (key,) if isinstance(key, str) else tuple(key)
