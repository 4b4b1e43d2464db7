"""Registry of model specs: `get_spec(name, path)` binds a spec to a model directory."""

from __future__ import annotations

from pathlib import Path

from .spec import Condition, ModelSpec


def _registry() -> dict[str, type[ModelSpec]]:
    from .zimage import ZImageSpec

    return {"zimage": ZImageSpec}


def spec_names() -> list[str]:
    return ["zimage"]


def get_spec(name: str, path: str | Path) -> ModelSpec:
    registry = _registry()
    if name not in registry:
        raise KeyError(f"unknown model spec {name!r}; known: {', '.join(registry)}")
    return registry[name](path)


__all__ = ["Condition", "ModelSpec", "get_spec", "spec_names"]
