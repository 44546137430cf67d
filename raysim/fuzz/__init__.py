"""Hostile and malformed input for the scenario loader and the data readers (issue 9).

Every malformed scenario, ``--set`` override, study or data file must end in exit code 2 with one
line on stderr, within a time bound, with no traceback and no run folder left behind.
``scenario_cases`` and ``data_cases`` generate the inputs (seeded, from the real schema and the
shipped scenarios), ``run_case`` runs one through ``raysim.cli.main`` in process and judges it.
``scripts/fuzz_scenarios.py`` and ``tests/test_fuzz.py`` drive them.
"""

from raysim.fuzz.datafiles import data_cases
from raysim.fuzz.judge import MAX_MESSAGE_CHARS, TIME_BOUND_S, Outcome, run_case, tally, warm_up
from raysim.fuzz.scenarios import CATEGORIES, scenario_cases
from raysim.fuzz.schema import Case

__all__ = ["CATEGORIES", "Case", "MAX_MESSAGE_CHARS", "Outcome", "TIME_BOUND_S", "data_cases", "run_case",
           "scenario_cases", "tally", "warm_up"]
