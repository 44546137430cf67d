"""Reading a scenario: a file or a mapping to a ``Scenario``, every problem one line naming the field.

``load_scenario`` reads the file safely (``yaml_safety``), applies ``--set`` overrides
(``overrides``) and validates the schema; ``scenario_to_yaml`` writes the resolved scenario back.
The checks that need the engine, the models or secure aggregation are not made here but by
``raysim.engine.validation``, which every command runs after these.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from raysim.config.overrides import apply_overrides
from raysim.config.scenario import Scenario
from raysim.config.yaml_safety import safe_yaml
from raysim.errors import ScenarioError, shown, shown_text

_NAMED_FIELD = re.compile(r"^[a-z_][a-z0-9_.]*: ")


def one_line(message: str, where: str = "scenario", echoed: str = "") -> str:
    """``message`` as is when it starts by naming its field, else prefixed with ``where`` and the fix."""
    if _NAMED_FIELD.match(message):
        return message
    return f"{where}: {message}{echoed}; fix it in the scenario or with --set {where}=..."


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = shown_text(".".join(str(part) for part in first["loc"]))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"{loc}: unknown key; remove it or check its spelling (see `raysim validate --help`)"
    got = first.get("input")
    return one_line(msg, loc or "scenario", "" if isinstance(got, dict) else f" (got {shown(got)})")


def _check_int_range(value: Any, where: str) -> None:
    """Refuse integers beyond int64, which no count, size or seed can be: unbounded fields such as
    training.batch_size would otherwise take 10^400 and fail deep inside a worker; and keys that are not
    strings, which pydantic would meet as keyword arguments."""
    if isinstance(value, dict):
        for key, child in value.items():
            if not isinstance(key, str):  # YAML's `null:` or `1:`; every scenario key is a name
                raise ScenarioError(f"{shown_text(where or 'scenario')}: the key {shown(key)} is not a name; "
                                    "scenario keys are words such as kind or rounds")
            _check_int_range(child, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for child in value:
            _check_int_range(child, where)
    elif isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        raise ScenarioError(f"{shown_text(where or 'scenario')}: {shown(value)} is beyond any count or size "
                            "(|n| < 2^63); use a realistic value")


def parse_scenario(raw: Any) -> Scenario:
    """Validate a mapping into a Scenario, turning pydantic's report into one line."""
    if not isinstance(raw, dict):
        raise ScenarioError("scenario: the file must hold a YAML mapping of keys to values")
    _check_int_range(raw, "")
    try:
        return Scenario.model_validate(raw)
    except ValidationError as err:
        raise ScenarioError(_format_validation_error(err)) from None


def load_scenario(path: str | Path, overrides: list[str] | None = None) -> Scenario:
    """Read, override and validate a scenario file. Raises ScenarioError with one line on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(f"scenario: file not found: {path}; pass the path to a .yaml scenario")
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as err:
        raise ScenarioError(f"{path}: cannot read the scenario as UTF-8 text ({type(err).__name__}); pass a YAML file") from None
    raw = safe_yaml(text, str(path))
    if not isinstance(raw, dict):
        raise ScenarioError(f"{path}: the scenario must be a YAML mapping of keys to values")
    raw.setdefault("name", path.stem)
    return parse_scenario(apply_overrides(raw, overrides or []))


def scenario_to_yaml(scenario: Scenario) -> str:
    """The resolved scenario, every default filled in, as YAML."""
    return yaml.safe_dump(scenario.model_dump(mode="json"), sort_keys=False)
