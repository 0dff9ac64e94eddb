"""The base of every configuration section (here, so each group of sections has its module)."""

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

__all__ = ["Section"]


class Section(BaseModel):
    """Base of all configuration sections: unknown keys are errors, instances are immutable,
    and a key whose value is null/empty means "use the default"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(
            value is None and key in cls.model_fields for key, value in data.items()
        ):
            return {
                key: value for key, value in data.items() if not (value is None and key in cls.model_fields)
            }
        return data
