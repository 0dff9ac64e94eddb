"""``TableName``: a plugin setting that names a lookup table, checked against ``tables:``.

When the configuration is loaded (``check-config``, start, reload) the plugin settings are
validated knowing the configuration's table names, so a name that is not there is an error
with its file, line and key, before anything runs. Outside a configuration (a plugin built
in a test) any name passes, and :func:`smtpproxy.get_table` says what is missing at run time.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, ValidationInfo
from pydantic_core import PydanticCustomError

__all__ = ["TableName"]


def _known_table(value: str, info: ValidationInfo) -> str:
    names = info.context.get("tables") if isinstance(info.context, dict) else None
    if names is not None and value not in names:
        known = ", ".join(sorted(names)) or "none are defined"
        raise PydanticCustomError("table_unknown", "{message}", {
            "message": f"no table named {value!r} in tables ({known})", "show_input": False})
    return value


TableName = Annotated[str, AfterValidator(_known_table)]
