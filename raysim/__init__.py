"""raysim: a Ray-distributed simulator for federated learning with privacy.

``raysim.run(scenario) -> Result`` is the notebook entry point, and ``with raysim.Session():`` keeps Ray and
the worker actors warm across runs; importing the package stays cheap, and Ray and torch load on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Result", "Scenario", "Session", "load_scenario", "run"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "run":
        from raysim.api import run

        return run
    if name == "Session":
        from raysim.engine.session import Session

        return Session
    if name == "Result":
        from raysim.engine.runner import Result

        return Result
    if name in ("Scenario", "load_scenario"):
        from raysim import config

        return getattr(config, name)
    raise AttributeError(f"module 'raysim' has no attribute {name!r}")
