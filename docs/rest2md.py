"""The reST bits our docstrings use, as Markdown, for the generated reference pages."""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:class|meth|func|attr|mod|data|exc|obj):`~?([^`]+)`")


def rest_to_markdown(text: str) -> str:
    """Turn the reST bits our docstrings use into Markdown.

    ``x`` stays a code span, :class:`~a.B` becomes `B`, and a paragraph ending in
    ``::`` ends in ``:`` (the indented block after it is a Markdown code block too).
    """

    def role(match: re.Match[str]) -> str:
        target = match.group(1)
        return f"`{target.rsplit('.', 1)[-1] if match.group(0).count('~') else target}`"

    text = _ROLE.sub(role, text)
    return re.sub(r"(?<=\S)::$", ":", text, flags=re.M)
