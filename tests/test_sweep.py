"""`raysim sweep`: grid expansion, validation of every run up front, one Ray, the study tables, and
`scripts/scale_study.py` on the result."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raysim.cli import main
from raysim.errors import ScenarioError
from raysim.sweep import load_study, plan, run_name, run_study, training_seconds_per_round

ROOT = Path(__file__).resolve().parents[1]


def _study(tmp_path: Path, base, grid, **extra) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "base": base, "grid": grid, "output": str(tmp_path / "out"), **extra}))
    return path


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_the_grid_expands_to_its_cartesian_product_with_zipped_keys(tiny_scenario, tmp_path):
    study = load_study(_study(tmp_path, tiny_scenario, {
        "partition.alpha": [0.1, 1.0],
        "strategy.name,strategy.server_lr": [["fedavg", 1.0], ["fedadam", 0.01]],
    }, set={"rounds": 2}))
    runs = plan(study)
    assert [r.values for r in runs] == [
        {"partition.alpha": a, "strategy.name": n, "strategy.server_lr": lr}
        for a in (0.1, 1.0) for n, lr in (("fedavg", 1.0), ("fedadam", 0.01))
    ]
    assert runs[2].scenario.name == "s-partition.alpha_1.0-strategy.name_fedavg-strategy.server_lr_1.0"
    for r in runs:
        assert r.scenario.rounds == 2 and r.scenario.tracking.group == "s"
        assert Path(r.scenario.output.dir) == tmp_path / "out" / "s"
        assert r.scenario.partition.alpha == r.values["partition.alpha"]


def test_run_names_are_sanitised_to_the_scenario_name_pattern():
    assert run_name("st", {"model.hidden": [64, 32], "data.path": "/x y/z.npz"}) == "st-model.hidden_64_32-data.path_x_y_z.npz"
    long = run_name("st", {"data.path": "p" * 300})
    assert len(long) == 120 and long == run_name("st", {"data.path": "p" * 300})


def test_seconds_per_round_leave_out_the_first_round_and_evaluation_rounds():
    history = [{"round": 1, "accuracy": 0.1}, {"round": 2}, {"round": 3}, {"round": 4, "accuracy": 0.5}]
    assert training_seconds_per_round([5.0, 1.0, 2.0, 9.0], history) == 1.5
    evaluated = [{"round": r, "accuracy": 0.5} for r in (1, 2, 3)]
    assert training_seconds_per_round([5.0, 1.0, 2.0], evaluated) == 1.5
    assert training_seconds_per_round([5.0], evaluated[:1]) == 5.0


def test_a_grid_key_that_does_not_exist_is_one_line_naming_it(tiny_scenario, tmp_path, capsys):
    path = _study(tmp_path, tiny_scenario, {"training.lrr": [0.1, 0.2]})
    assert main(["sweep", str(path)]) == 2
    line = _one_line_error(capsys)
    assert "grid.training.lrr" in line and "unknown key" in line


def test_every_run_is_validated_before_any_runs(tiny_scenario, tmp_path, capsys):
    path = _study(tmp_path, tiny_scenario, {"sampling.clients_per_round": [10, 500]})
    assert main(["sweep", str(path)]) == 2
    line = _one_line_error(capsys)
    assert "s-sampling.clients_per_round_500" in line and "num_clients" in line
    assert not (tmp_path / "out").exists()


def test_a_base_file_is_read_relative_to_the_study(tiny_scenario, tmp_path, capsys):
    (tmp_path / "scenarios").mkdir()
    (tmp_path / "scenarios" / "base.yaml").write_text(yaml.safe_dump(tiny_scenario))
    path = _study(tmp_path, "scenarios/base.yaml", {"seed": [1, 2]})
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == ["s-seed_1", "s-seed_2"]
    assert main(["validate", str(path)]) == 0


@pytest.mark.parametrize("study", sorted((ROOT / "scenarios" / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_studies_are_valid(study, capsys):
    assert main(["sweep", str(study), "--dry-run"]) == 0
    assert "valid study" in capsys.readouterr().out


def test_a_sweep_shares_one_ray_and_writes_a_row_per_run(ray_session, tiny_scenario, tmp_path, monkeypatch):
    monkeypatch.setattr(ray_session, "init", lambda *a, **k: pytest.fail("a sweep must reuse the Ray it is connected to"))
    study = load_study(_study(tmp_path, tiny_scenario, {"sampling.clients_per_round": [10, 20]}, set={"rounds": 2}))
    rows = run_study(study, plan(study))
    with open(study.folder / "study.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [row["sampling.clients_per_round"] for row in table] == ["10", "20"]
    for row in table:
        assert row["status"] == "ok"
        assert float(row["accuracy"]) > 0 and float(row["seconds_per_round"]) > 0 and float(row["peak_rss_gb"]) > 0
        assert float(row["clients_per_round"]) == float(row["sampling.clients_per_round"])
        config = yaml.safe_load((Path(row["run_dir"]) / "config.yaml").read_text())
        assert config["tracking"]["group"] == "s"
    assert len(rows) == 2
    markdown = (study.folder / "study.md").read_text()
    assert markdown.count("\n| ") == 3 and "seconds_per_round" in markdown


def _fake_execute(outcomes: dict[str, Exception], calls: list[str]):
    """An ``execute`` that fails the runs named in ``outcomes`` and finishes the others at once."""
    from raysim.engine.runner import Result

    def execute(scenario, address=None, resume=None, session=None):
        calls.append(scenario.name)
        if scenario.name in outcomes:
            raise outcomes[scenario.name]
        folder = Path(scenario.output.dir) / scenario.name
        return Result(run_dir=folder, summary={"final": {"accuracy": 0.5, "loss": 1.0}},
                      history=[{"round": 1, "clients": 20}, {"round": 2, "clients": 20}], round_seconds=[0.9, 0.1])

    return execute


def test_a_crash_leaves_the_rows_of_the_finished_runs(ray_session, tiny_scenario, tmp_path, monkeypatch):
    import raysim.engine.runner as runner

    calls: list[str] = []
    monkeypatch.setattr(runner, "execute", _fake_execute({"s-seed_2": RuntimeError("node lost")}, calls))
    study = load_study(_study(tmp_path, tiny_scenario, {"seed": [1, 2, 3]}))
    with pytest.raises(RuntimeError):
        run_study(study, plan(study))
    assert calls == ["s-seed_1", "s-seed_2"]
    with open(study.folder / "study.csv", newline="") as handle:
        (row,) = csv.DictReader(handle)
    assert row["run"] == "s-seed_1" and float(row["seconds_per_round"]) == pytest.approx(0.1)


def test_a_run_that_fails_on_its_data_is_a_row_and_the_study_goes_on(ray_session, tiny_scenario, tmp_path, monkeypatch):
    import raysim.engine.runner as runner

    calls: list[str] = []
    failure = ScenarioError("partition.min_size: after 100 Dirichlet draws some client still had fewer than 5 samples")
    monkeypatch.setattr(runner, "execute", _fake_execute({"s-partition.alpha_0.01": failure}, calls))
    study = load_study(_study(tmp_path, tiny_scenario, {"partition.alpha": [0.01, 0.5]}))
    rows = run_study(study, plan(study))
    assert calls == ["s-partition.alpha_0.01", "s-partition.alpha_0.5"]
    assert rows[0]["status"].startswith("failed: partition.min_size") and rows[0]["accuracy"] is None
    assert rows[1]["status"] == "ok" and rows[1]["accuracy"] == 0.5


def test_scale_study_flags_growth_that_departs_from_the_design(tmp_path):
    rows = [
        # seconds/round: flat from 1k to 100k clients, then triples at 1M (a departure); linear in cohort size
        (1000, 10, 0.10, 1.0), (100_000, 10, 0.10, 1.1), (1_000_000, 10, 0.30, 1.3),
        (1000, 100, 1.00, 1.0), (100_000, 100, 1.00, 1.1), (1_000_000, 100, 3.00, 1.3),
    ]
    csv_path = tmp_path / "study.csv"
    csv_path.write_text("run,status,num_clients,clients_per_round,seconds_per_round,peak_rss_gb\n"
                        + "".join(f"r{i},ok,{n},{c},{s},{m}\n" for i, (n, c, s, m) in enumerate(rows))
                        + "broken,failed: x,10,10,,\n")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "scale_study.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    departures = [line for line in proc.stdout.splitlines() if line.startswith("DEPARTS")]
    assert departures == [
        f"DEPARTS seconds per round vs population (clients) at clients_per_round={c}: 100,000 -> 1,000,000 slope +0.48, "
        "expected flat (0) (grows faster than expected)" for c in (10, 100)
    ]
    assert "seconds per round vs clients per round at num_clients=1,000: 10 -> 100 slope +1.00" in proc.stdout
    assert {p.name for p in tmp_path.iterdir()} >= {"scale.md", "seconds_per_round.png", "memory.png"}
    assert (tmp_path / "scale.md").read_text().count("\n|") == 7


def test_bad_study_files_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: s\nbase: {}\ngrid: {seed: 3}\n")
    assert main(["sweep", str(bad)]) == 2
    assert "grid.seed" in _one_line_error(capsys)
    bad.write_text("name: s\nbase: missing.yaml\ngrid: {seed: [1]}\n")
    assert main(["sweep", str(bad)]) == 2
    assert "base" in _one_line_error(capsys)
    bad.write_text("name: s\nbase: {}\ngrid: {seed: [1]}\nrepeat: 3\n")
    assert main(["sweep", str(bad)]) == 2
    assert "repeat" in _one_line_error(capsys)
    with pytest.raises(ScenarioError, match="grid.strategy.name,strategy.server_lr"):
        load_study(_study(tmp_path, {}, {"strategy.name,strategy.server_lr": ["fedavg"]}))
