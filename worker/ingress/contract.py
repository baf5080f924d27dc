"""The published contracts: JSON Schemas of the event and the decision, generated from the pydantic models.

The checked-in copies under worker/ingress/schemas/ are what producers in other languages validate against
(``moderation schema event|decision`` prints them); a test keeps them equal to the models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from worker.records import DECISION_SCHEMA_VERSION, EVENT_SCHEMA_VERSION, Decision, Event

SCHEMA_DIR = Path(__file__).with_name("schemas")
SCHEMAS: dict[str, tuple[type[BaseModel], int]] = {
    "event": (Event, EVENT_SCHEMA_VERSION),
    "decision": (Decision, DECISION_SCHEMA_VERSION),
}


def schema(name: str) -> dict[str, Any]:
    model, version = SCHEMAS[name]
    generated = model.model_json_schema(mode="validation" if name == "event" else "serialization")
    out: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://moderation.invalid/schemas/{name}/v{version}.json",
        **generated,
    }
    return out


def schema_json(name: str) -> str:
    return json.dumps(schema(name), indent=2, sort_keys=True) + "\n"


def schema_path(name: str) -> Path:
    return SCHEMA_DIR / f"{name}.schema.json"


def write_schemas() -> list[Path]:
    """Regenerate the checked-in files (after changing a model): ``python -m worker.ingress.contract``."""
    paths = []
    for name in SCHEMAS:
        path = schema_path(name)
        path.write_text(schema_json(name))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write_schemas():
        print(p)
