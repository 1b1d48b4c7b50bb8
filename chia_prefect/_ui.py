"""How fields look in the Prefect UI's block forms."""

from __future__ import annotations

from typing import Any

from pydantic import Field


def ui_optional(schema: dict[str, Any]) -> None:
    """Show an optional field as one plain input (left empty: None), not a type/null switch.

    Python still accepts None; only the JSON schema the UI draws from loses the null branch.
    """
    branches = [branch for branch in schema.get("anyOf", []) if branch.get("type") != "null"]
    if len(branches) == 1:
        del schema["anyOf"]
        schema.update(branches[0])


def optional_field(title: str, description: str, **constraints: Any) -> Any:
    """A field that defaults to None, drawn by the UI as one plain input (`ui_optional`)."""
    return Field(default=None, title=title, description=description, json_schema_extra=ui_optional, **constraints)
