"""The Python API for notebooks: ``raysim.run(scenario) -> Result``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raysim.config import Scenario, apply_overrides, load_scenario, parse_scenario
from raysim.engine.runner import Result, execute


def run(scenario: Scenario | str | Path | dict[str, Any], *, overrides: list[str] | None = None, address: str | None = None) -> Result:
    """Run a scenario given as a Scenario, a YAML path or a plain mapping, with optional ``key=value`` overrides.

    Inside ``with raysim.Session():`` the run reuses the session's Ray connection and warm workers."""
    if isinstance(scenario, (str, Path)):
        resolved = load_scenario(scenario, overrides)
    elif isinstance(scenario, Scenario):
        resolved = parse_scenario(apply_overrides(scenario.model_dump(mode="json"), overrides or []))
    else:
        resolved = parse_scenario(apply_overrides(scenario, overrides or []))
    return execute(resolved, address=address)
