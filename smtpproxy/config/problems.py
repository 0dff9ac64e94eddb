"""Problems and ConfigError: every configuration mistake as one located line.

``file:line:col: key: message`` -- the same shape for YAML syntax, schema, plugin settings
and reload errors. No smtpproxy imports.
"""

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

PathElement = str | int

# --------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a configuration, located as precisely as possible."""

    file: str
    line: int | None
    column: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        parts = [where, self.key, self.message] if self.key else [where, self.message]
        return ": ".join(parts)


class ConfigError(Exception):
    """Configuration that cannot be used; str() is one or more lines 'file:line:col: key.path: message'."""

    problems: list[Problem]

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(problem) for problem in self.problems)

    def __reduce__(self) -> tuple[type["ConfigError"], tuple[list[Problem]]]:
        return (type(self), (self.problems,))


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")


def format_key(path: Sequence[PathElement]) -> str:
    """Render a key path for humans: ``("listeners", 0, "port")`` -> ``"listeners[0].port"``.

    Keys that are not simple identifiers are quoted (``settings["a.b"]``).
    """
    out = ""
    for element in path:
        if isinstance(element, int) and not isinstance(element, bool):
            out += f"[{element}]"
        elif isinstance(element, str) and _PLAIN_KEY.match(element):
            out += f".{element}" if out else element
        elif isinstance(element, str):
            out += f"[{json.dumps(element, ensure_ascii=False)}]"
        else:
            out += f"[{element!r}]"
    return out


def describe_value(value: object) -> str:
    """Short rendering of an offending input value for error messages."""
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= 60 else text[:56] + "...'"
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"
