"""Registry of model specs: `get_spec(name, path)` binds a spec to a model directory."""

from __future__ import annotations

from pathlib import Path

from .spec import Condition, ModelSpec


def _registry() -> dict[str, type[ModelSpec]]:
    from .flux2_klein import Flux2KleinSpec
    from .toyworld import ToyWorldSpec
    from .zimage import ZImageSpec

    return {"zimage": ZImageSpec, "toyworld": ToyWorldSpec, "flux2_klein": Flux2KleinSpec}


def spec_names() -> list[str]:
    return list(_registry())


# diffusers pipeline classes -> the spec that knows them
_PIPELINE_CLASSES = {"ZImagePipeline": "zimage", "Flux2KleinPipeline": "flux2_klein"}


def detect_spec_name(path: str | Path) -> str:
    """The spec of a model directory: a toy directory, or a pipeline's `model_index.json` class."""
    from .spec import read_json

    path = Path(path)
    if (path / "toyworld.json").is_file():
        return "toyworld"
    index = path / "model_index.json"
    if index.is_file():
        cls = read_json(index).get("_class_name", "")
        if cls in _PIPELINE_CLASSES:
            return _PIPELINE_CLASSES[cls]
        raise ValueError(f"{index}: pipeline class {cls!r} has no model spec (known: {', '.join(_PIPELINE_CLASSES)})")
    raise FileNotFoundError(f"{path}: neither a diffusers pipeline (model_index.json) nor a toy model directory")


def get_spec(name: str, path: str | Path) -> ModelSpec:
    registry = _registry()
    if name not in registry:
        raise KeyError(f"unknown model spec {name!r}; known: {', '.join(registry)}")
    return registry[name](path)


__all__ = ["Condition", "ModelSpec", "detect_spec_name", "get_spec", "spec_names"]
