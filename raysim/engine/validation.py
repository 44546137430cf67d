"""The one validation step after the schema: the checks that need the models or secure aggregation.

``raysim.config`` checks everything a scenario says on its own; what it cannot check without
importing the rest of raysim is checked here: that secure aggregation's round parameters exist for the
cohort (``raysim.privacy.secagg.setup.round_params``), that the he backend's encryption parameters are secure
and hold the sum (``raysim.privacy.he.params.choose_params``), and that a language model and its adapters build
(``raysim.models.hf.check_model``, on the meta device, without weights). ``raysim validate``,
``raysim run``, ``raysim resume``, ``raysim sweep``, ``raysim.run`` and the runner itself all pass
through ``validate``; the fuzz harness reaches it through the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raysim.config import Scenario, load_scenario, one_line, parse_scenario
from raysim.errors import ScenarioError


def validate(scenario: Scenario) -> Scenario:
    """``scenario`` unchanged if it can run as far as configuration can tell; else one-line ScenarioError."""
    try:
        if scenario.secure_aggregation is not None and scenario.sampling.kind == "uniform":
            from raysim.privacy.secagg.setup import round_params  # lazy: crypto, only for secure scenarios

            round_params(scenario.secure_aggregation, scenario.sampling.clients_per_round)
        if scenario.secure_aggregation is not None and scenario.secure_aggregation.backend == "he":
            from raysim.privacy.he.params import choose_params  # the run checks the packing again with the model's size
            from raysim.privacy.he.setup import largest_cohort

            choose_params(scenario.secure_aggregation, largest_cohort(scenario), 1)
        if scenario.model.is_language_model:
            from raysim.models.hf import check_model  # lazy: torch and transformers, only for language models

            check_model(scenario.model, seq_len=scenario.data.seq_len)
    except ValueError as err:  # a library's ValueError becomes one line, as the schema's own errors do
        raise ScenarioError(one_line(str(err))) from None
    return scenario


def parse_and_validate(raw: Any) -> Scenario:
    """``parse_scenario`` then ``validate``: a mapping to a scenario that can run."""
    return validate(parse_scenario(raw))


def load_and_validate(path: str | Path, overrides: list[str] | None = None) -> Scenario:
    """``load_scenario`` then ``validate``: a scenario file, with ``--set`` overrides, to a scenario that can run."""
    return validate(load_scenario(path, overrides))
