"""What a table raises: unusable configuration at load, an unanswerable lookup at run time."""

from __future__ import annotations

__all__ = ["TableError", "TableUnavailable"]


class TableError(ValueError):
    """A table's definition or file cannot be used; str() says where (``file:line: problem``)."""


class TableUnavailable(Exception):
    """A lookup that could not be answered (backend down, slow, or erroring).

    Never a silent "not found": callers turn it into a temporary failure (4xx), as a plugin's
    exception is by the chain. str() names the table and the reason, never a password.
    """

    def __init__(self, table: str, reason: str):
        super().__init__(f"table {table}: {reason}")
        self.table = table
        self.reason = reason
