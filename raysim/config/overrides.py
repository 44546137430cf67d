"""``--set key.path=value`` overrides: applied to a raw scenario mapping, each path checked against the schema."""

from __future__ import annotations

import copy
import typing
from typing import Any

from pydantic import BaseModel

from raysim.config.scenario import Scenario
from raysim.config.yaml_safety import safe_yaml
from raysim.errors import ScenarioError, shown_text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides; values are parsed as YAML scalars or lists."""
    merged = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ScenarioError(f"--set {shown_text(item)}: expected key.path=value, e.g. --set training.lr=0.1")
        path, text = item.split("=", 1)
        keys = [k for k in path.strip().split(".") if k]
        if not keys:
            raise ScenarioError(f"--set {shown_text(item)}: the key path is empty; use e.g. training.lr=0.1")
        value = safe_yaml(text, f"--set {shown_text(path)}") if text.strip() else None
        check_known_path(keys, f"--set {shown_text(path)}")
        node = merged
        for key in keys[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
        node[keys[-1]] = value
    return merged


def check_known_path(keys: list[str], what: str) -> None:
    """Refuse a key path the schema does not have, or one that goes below a value; ``what`` names it."""
    model: type[BaseModel] | None = Scenario
    for depth, key in enumerate(keys):
        if model is None:
            return  # below a free-form mapping (e.g. secure_aggregation.dropout): any key is allowed
        named = shown_text(".".join(keys[: depth + 1]))
        if key not in model.model_fields:
            raise ScenarioError(f"{what}: unknown key '{named}'; check its spelling")
        model = _submodel(model.model_fields[key].annotation)
        if model is None and depth + 1 < len(keys) and not _is_mapping(_field_type(keys, depth)):
            raise ScenarioError(f"{what}: '{named}' is a value, not a section; check the path")


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as ``X`` or ``X | None``, if there is one."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _field_type(keys: list[str], depth: int) -> Any:
    model: Any = Scenario
    for key in keys[:depth]:
        model = _submodel(model.model_fields[key].annotation)
    return model.model_fields[keys[depth]].annotation


def _is_mapping(annotation: Any) -> bool:
    return any(typing.get_origin(a) is dict or a is dict for a in (annotation, *typing.get_args(annotation)))
