"""headers: add fixed headers to every message (and optionally remove some first).

    plugins:
      - name: headers
        settings:
          add: {X-Filtered-By: "smtpproxy at mx1"}
          remove: [X-Internal-Route]

Values may use ``{client_ip}``, ``{helo}``, ``{session_id}``, ``{transaction_id}``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from smtpproxy import Message, Session, Transaction, hookimpl


class AddHeaders:
    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        add: dict[str, str] = Field(default_factory=dict, description="Headers to add at the top.")
        remove: list[str] = Field(default_factory=list, description="Headers to remove first.")

    def __init__(self, settings: Settings):
        self.settings = settings

    @hookimpl
    def data(self, session: Session, transaction: Transaction, message: Message) -> None:
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
