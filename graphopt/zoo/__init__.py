"""graphopt's reference models (model source `zoo:NAME`)."""
from __future__ import annotations

from ..errors import GraphoptError

MODELS: dict[str, object] = {}


def available() -> list[str]:
    return sorted(MODELS)


def load_source(name: str):
    if name not in MODELS:
        raise GraphoptError(f"unknown zoo model '{name}'; available: {', '.join(available()) or '(none yet)'}")
    return MODELS[name]()
