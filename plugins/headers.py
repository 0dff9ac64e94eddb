"""headers: add fixed headers to every message (and optionally remove some first).

    plugins:
      - name: headers
        settings:
          add: {X-Filtered-By: "smtpproxy at mx1"}
          remove: [X-Internal-Route]

Values may use ``{client_ip}``, ``{helo}``, ``{session_id}``, ``{transaction_id}``. Names,
templates and placeholders are checked when the configuration is loaded, so a typo fails
``smtpproxy check-config`` instead of tempfailing every message.
"""

from __future__ import annotations

import string

from pydantic import Field, field_validator

from smtpproxy import (
    HeaderError,
    Message,
    PluginSettings,
    Session,
    SettingsError,
    Transaction,
    hookimpl,
    validate_header,
)

# A sample value per placeholder, so templates are formatted for real at load time.
PLACEHOLDERS = {
    "client_ip": "192.0.2.1",
    "helo": "client.example",
    "session_id": "0123456789abcdef",
    "transaction_id": "0123456789abcdef.1",
}


class AddHeaders:
    class Settings(PluginSettings):
        add: dict[str, str] = Field(
            default_factory=dict,
            description="Headers to add at the top; values may use {client_ip}, {helo}, "
            "{session_id} and {transaction_id}.",
        )
        remove: list[str] = Field(default_factory=list, description="Headers to remove first.")

        @field_validator("remove")
        @classmethod
        def _names(cls, value: list[str]) -> list[str]:
            for name in value:
                try:
                    validate_header(name)
                except HeaderError as exc:
                    raise ValueError(str(exc)) from None
            return value

    def __init__(self, settings: Settings):
        # Checked here rather than in a validator so the error points at the header's own key.
        for name, template in settings.add.items():
            _check_template(name, template)
        self.settings = settings

    @hookimpl
    async def data(self, session: Session, transaction: Transaction, message: Message) -> None:
        for name in self.settings.remove:
            message.remove_header(name)
        values = {
            "client_ip": session.client.ip,
            "helo": session.helo or "",
            "session_id": session.id,
            "transaction_id": transaction.id,
        }
        for name, template in self.settings.add.items():
            message.add_header(name, template.format_map(values))


def _check_template(name: str, template: str) -> None:
    try:
        for _, field, _, _ in string.Formatter().parse(template):
            if field is not None and field not in PLACEHOLDERS:
                raise KeyError(field)
        value = template.format_map(PLACEHOLDERS)
    except KeyError as exc:
        known = ", ".join("{" + k + "}" for k in PLACEHOLDERS)
        raise SettingsError(f"unknown placeholder {{{exc.args[0]}}}; available: {known}",
                            key=("add", name)) from None
    except (ValueError, IndexError, AttributeError) as exc:
        raise SettingsError(f"not a valid template ({exc}); write a literal brace as {{{{ or }}}}",
                            key=("add", name)) from None
    try:
        validate_header(name, value)
    except HeaderError as exc:
        raise SettingsError(str(exc), key=("add", name)) from None
