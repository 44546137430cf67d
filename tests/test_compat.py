"""The feature-compatibility table (``raysim.config.compat``): every row refuses exactly its example, with one
line naming its field, through the schema and the command line; the README's matrix is the rendered table.

Pure pydantic and in process (no Ray, no models), but for one subprocess through ``python -m raysim.cli``.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raysim.cli import main
from raysim.config import apply_overrides, check_known_path, compat, parse_scenario
from raysim.errors import ScenarioError
from raysim.fuzz.schema import load_bases, set_path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
BASE = yaml.safe_load(QUICKSTART.read_text())
ROWS = compat.ROWS
IDS = [f"{a} x {b}" for a, b in (row.features for row in ROWS)]


def _with_example(row: compat.Exclusion) -> dict:
    return apply_overrides(BASE, row.overrides)


def test_the_base_scenario_is_valid():
    parse_scenario(BASE)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_each_example_is_refused_with_its_rows_message(row):
    with pytest.raises(ScenarioError) as raised:
        parse_scenario(_with_example(row))
    message = str(raised.value)
    assert message.startswith(row.field + ": ") and "\n" not in message
    assert message == row.message  # this row fired, not an earlier one


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_each_example_is_valid_once_its_row_is_taken_out(row, monkeypatch):
    """The example combines this row's features and nothing else the schema refuses, so the refusal is the row's."""
    monkeypatch.setattr(compat, "ROWS", tuple(r for r in ROWS if r is not row))
    parse_scenario(_with_example(row))


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_raysim_validate_refuses_each_row_with_one_line_and_exit_2(row, capsys):
    argv = ["validate", str(QUICKSTART), *(arg for setting in row.overrides for arg in ("--set", setting))]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"raysim: error: {row.message}"


def test_a_row_through_the_installed_command_exits_2():
    row = ROWS[0]
    proc = subprocess.run([sys.executable, "-m", "raysim.cli", "validate", str(QUICKSTART),
                           *(arg for setting in row.overrides for arg in ("--set", setting))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"raysim: error: {row.message}"]


def test_every_example_is_refused_on_every_shipped_scenario():
    """How the fuzz harness uses the rows: an example written over any shipped scenario is still refused."""
    accepted = []
    for name, base in load_bases(ROOT / "scenarios"):
        for row, label in zip(ROWS, IDS):
            raw = copy.deepcopy(base)
            for dotted, value in row.example.items():
                set_path(raw, dotted, copy.deepcopy(value))
            try:
                parse_scenario(raw)
            except ScenarioError:
                continue
            accepted.append(f"{label} on {name}")
    assert not accepted, accepted


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_rows_are_well_formed(row):
    assert row.kind in compat.KIND_TITLES
    assert len(row.features) == 2 and row.features[0] != row.features[1]
    check_known_path(row.field.split("."), "field")
    for dotted in row.example:
        check_known_path(dotted.split("."), "example")
    assert ";" not in row.reason and "|" not in row.reason and "\n" not in row.message
    assert re.match(r"^[a-z_][a-z0-9_.]*: ", row.message)  # the loader's test for a message naming its field


# The table as reviewed: a row deleted, added or reclassified is a change here too, so it cannot go by unnoticed
# (deleting a row also deletes its parametrized cases above).
PINNED = [
    (("over-selection", "Poisson sampling"), "nature"),
    (("asynchronous modes", "no system block"), "nature"),
    (("asynchronous modes", "over-selection"), "nature"),
    (("asynchronous modes", "a round deadline"), "nature"),
    (("asynchronous modes", "SCAFFOLD"), "not_built"),
    (("FedAsync", "a server optimizer"), "nature"),
    (("FedAsync", "secure aggregation"), "nature"),
    (("the he backend", "the SecAgg+ graph"), "nature"),
    (("the he backend", "the consistency check"), "nature"),
    (("the he backend", "dropouts in masking's key-setup phases"), "nature"),
    (("CKKS", "distributed DP"), "not_built"),
    (("the shared random mask", "FedBuff under secure aggregation"), "not_built"),
    (("secure aggregation diagnostics", "asynchronous modes"), "not_built"),
    (("asynchronous modes", "stragglers"), "not_built"),
    (("SCAFFOLD", "Adam or momentum in local training"), "nature"),
    (("central DP", "FedAsync"), "not_built"),
    (("adaptive clipping", "asynchronous modes"), "not_built"),
    (("distributed DP", "no secure aggregation"), "nature"),
    (("DP-SCAFFOLD", "secure aggregation"), "not_built"),
    (("local DP-SGD", "adaptive clipping"), "not_built"),
    (("local DP-SGD with a target ε", "asynchronous modes"), "not_built"),
    (("local DP-SGD", "a budget stop"), "not_built"),
    (("adaptive clipping", "distributed DP"), "not_built"),
    (("a CNN", "non-image data"), "nature"),
    (("a robust rule", "secure aggregation"), "nature"),
    (("a robust rule", "differential privacy"), "not_built"),
    (("a robust rule", "FedAsync"), "nature"),
    (("top-k or random-k compression", "secure aggregation"), "nature"),
    (("quantize or sign compression", "secure aggregation"), "not_built"),
    (("the shared random mask", "SCAFFOLD under secure aggregation"), "not_built"),
    (("downlink compression", "asynchronous modes"), "not_built"),
    (("the leakage lab", "text data"), "not_built"),
    (("the leakage lab", "asynchronous modes"), "not_built"),
    (("attacks", "text data"), "not_built"),
    (("text data", "a non-language model"), "nature"),
    (("a language model", "numeric data"), "nature"),
    (("vectorized training", "a transformers model"), "not_built"),
    (("vectorized training", "local DP-SGD with FedProx or SCAFFOLD"), "not_built"),
    (("vectorized training", "personalization"), "not_built"),
    (("personalization", "no federated evaluation"), "nature"),
    (("personalization", "SCAFFOLD"), "not_built"),
    (("FedPer", "FedProx"), "not_built"),
    (("personalization", "a language model"), "not_built"),
    (("token weighting", "numeric data"), "nature"),
]


def test_the_table_is_the_reviewed_one():
    assert [(row.features, row.kind) for row in ROWS] == PINNED


def test_feature_pairs_are_distinct():
    pairs = [frozenset(row.features) for row in ROWS]
    assert len(set(pairs)) == len(pairs)


def test_the_readme_matrix_is_the_rendered_table():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    shown = re.search(r"<!-- compat:begin -->\n(.*?)<!-- compat:end -->", readme, re.S)
    assert shown, "README.md lost its compatibility matrix markers"
    assert shown.group(1) == compat.markdown(), (
        "README.md's matrix differs from raysim/config/compat.py; paste the output of "
        "python -c 'from raysim.config.compat import markdown; print(markdown(), end=\"\")'")
