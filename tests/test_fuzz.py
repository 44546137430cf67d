"""Hostile and malformed input (issue 9): every malformed scenario, override, study or data file ends in
exit code 2 with one line on stderr, within the time bound, with no traceback and no run folder.

Cases run in process through ``raysim.cli.main``; ``run`` cases meet a tripwire instead of Ray.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import yaml

from raysim.fuzz import CATEGORIES, Case, data_cases, run_case, scenario_cases, warm_up
from raysim.fuzz.hostile import anchor_bomb, deep_nesting
from raysim.fuzz.schema import DIR, SCENARIO, dump

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "scenarios"
GENERATED = 14 * len(CATEGORIES)  # 210: at least 200, every category 14 times


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    warm_up(SCENARIOS)
    return tmp_path_factory.mktemp("fuzz")


def _report(outcomes) -> str:
    return "\n".join(f"[{o.case.category}] {o.case.description[:100]}: {o.reason[:300]}" for o in outcomes)


def _refused(case: Case, workdir: Path, *fragments: str) -> str:
    outcome = run_case(case, workdir)
    assert outcome.verdict == "rejected", f"{case.description}: {outcome.reason}"
    line = outcome.stderr.strip()
    assert "\n" not in line and "Traceback" not in line and line.startswith("raysim: error: ")
    for fragment in fragments:
        assert fragment in line, line
    return line


def _scenario_text(text: str | bytes, description: str = "named case") -> Case:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return Case("named", description, {SCENARIO: data})


def _npz_case(description: str, **arrays) -> Case:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return _data_case(description, buf.getvalue())


def _data_case(description: str, npz: bytes) -> Case:
    scenario = {"name": "named", "num_clients": 4, "rounds": 1, "data": {"source": "npz", "path": f"{DIR}/d.npz"},
                "partition": {"kind": "iid"}, "sampling": {"clients_per_round": 2}, "model": {"kind": "logreg"},
                "output": {"dir": f"{DIR}/out"}}
    return Case("named", description, {SCENARIO: dump(scenario), "d.npz": npz}, command="run")


X = np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32)
Y = np.arange(40) % 3


def test_generated_malformed_scenarios_all_end_in_one_line_and_exit_2(workdir):
    cases = scenario_cases(GENERATED, seed=0, folder=SCENARIOS)
    outcomes = [run_case(case, workdir) for case in cases]
    escaped = [o for o in outcomes if o.verdict == "escaped"]
    accepted = [o for o in outcomes if o.verdict == "accepted"]
    print(f"fuzz_cases: {len(outcomes)} fuzz_escaped: {len(escaped)} fuzz_accepted: {len(accepted)}")
    assert not escaped, f"{len(escaped)} of {len(outcomes)} cases escaped:\n{_report(escaped)}"
    assert len(accepted) <= len(cases) // 10, f"the mutations are mostly valid scenarios:\n{_report(accepted)}"


def test_malformed_data_files_all_end_in_one_line_and_exit_2_before_ray_starts(workdir):
    outcomes = [run_case(case, workdir) for case in data_cases(seed=0)]
    escaped = [o for o in outcomes if o.verdict != "rejected"]
    print(f"fuzz_data_cases: {len(outcomes)} fuzz_data_escaped: {len(escaped)}")
    assert not escaped, f"{len(escaped)} of {len(outcomes)} data cases escaped:\n{_report(escaped)}"


def test_the_judge_accepts_a_valid_scenario_and_stops_a_valid_run_at_the_ray_tripwire(workdir):
    valid = _scenario_text((SCENARIOS / "quickstart.yaml").read_bytes())
    assert run_case(Case("named", "quickstart", valid.files, must_reject=False), workdir).verdict == "accepted"
    run = run_case(_npz_case("a valid npz", x=X, y=Y), workdir)
    assert run.verdict == "escaped" and "before Ray starts" in run.reason  # valid, so accepting it is flagged


def test_a_billion_laughs_anchor_bomb_is_refused_before_it_expands(workdir):
    _refused(_scenario_text(anchor_bomb("list", levels=12, fan=10), "10^12 laughs"), workdir, "nodes")


def test_an_anchor_bomb_in_a_set_value_is_refused(workdir):
    case = Case("named", "bomb in --set", {SCENARIO: (SCENARIOS / "quickstart.yaml").read_bytes()},
                overrides=("--set", "model.hidden=" + anchor_bomb("flow_value", levels=9, fan=9)))
    _refused(case, workdir, "--set model.hidden")


@pytest.mark.parametrize("form", ["flow_list", "flow_map", "block_seq", "block_map", "in_field"])
def test_yaml_nested_10000_levels_deep_is_refused(workdir, form):
    _refused(_scenario_text(deep_nesting(form, 10_000), f"depth 10000 ({form})"), workdir, "deeper than")


def test_binary_garbage_and_invalid_utf8_are_refused(workdir):
    garbage = bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8))
    _refused(_scenario_text(garbage, "random bytes"), workdir)
    _refused(_scenario_text(b"name: \xc0\xaf\nrounds: 2\n", "overlong UTF-8"), workdir, "UTF-8")


@pytest.mark.parametrize(("text", "fragment"), [(b"", "empty"), (b"\n\n", "empty"), (b"# only a comment\n", "empty"),
                                              (b"---\n", "mapping")])
def test_an_empty_scenario_is_refused(workdir, text, fragment):
    _refused(_scenario_text(text, "empty"), workdir, fragment)


def test_a_huge_echoed_value_stays_a_short_line(workdir):
    line = _refused(_scenario_text(yaml.safe_dump({"name": "x" * 200_000}), "200 KB name"), workdir, "name")
    assert len(line) < 300


def test_a_truncated_npz_names_data_path(workdir):
    buf = io.BytesIO()
    np.savez(buf, x=X, y=Y)
    _refused(_data_case("truncated", buf.getvalue()[:300]), workdir, "data.path", "truncated")


def test_x_and_y_of_different_lengths_name_both_counts(workdir):
    _refused(_npz_case("40 x, 39 y", x=X, y=Y[:-1]), workdir, "data.path", "40", "39")


@pytest.mark.parametrize(("labels", "fragment"), [
    (np.where(Y == 1, -1, Y), "non-negative"),
    (np.where(Y == 1, 10**9, Y), "class ids in [0, 100000)"),
    (np.where(Y == 1, 0.5, Y), "non-negative integers"),
    (np.zeros(40, dtype=np.int64), "at least two classes"),
])
def test_labels_out_of_range_are_refused_before_ray_starts(workdir, labels, fragment):
    _refused(_npz_case(f"labels {fragment}", x=X, y=labels), workdir, "data.path", fragment)
