"""The command line: every bad input is one line naming the field, exit code 2, and no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raysim.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = yaml.safe_load((ROOT / "scenarios" / "quickstart.yaml").read_text())


def _write(tmp_path, text, name="bad.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "raysim.cli", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def _assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _scenario(tmp_path, **changes):
    raw = yaml.safe_load(yaml.safe_dump(QUICKSTART))
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return _write(tmp_path, yaml.safe_dump(raw))


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"training__learning_rate": 0.1}, ["training.learning_rate", "unknown key"]),
        ({"training__lr": -0.1}, ["training.lr", "greater than 0"]),
        ({"sampling__clients_per_round": 5000}, ["sampling.clients_per_round", "num_clients"]),
        ({"partition__alpha": 0.0}, ["partition.alpha", "greater than 0"]),
        ({"data__source": "npz", "data__path": "/nonexistent/train.npz"}, ["data.path", "not found"]),
        ({"executor__num_workers": 0}, ["executor.num_workers"]),
        ({"sampling__kind": "poisson"}, ["sampling.rate"]),
    ],
)
def test_validate_rejects_bad_scenarios_with_one_line(tmp_path, changes, fragments):
    _assert_one_line_error(_cli("validate", str(_scenario(tmp_path, **changes))), *fragments)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = _write(tmp_path, "name: x\ntraining:\n  lr: [0.1\n")
    _assert_one_line_error(_cli("validate", str(path)), "YAML syntax error", "line")


def test_empty_and_binary_files_are_rejected(tmp_path):
    _assert_one_line_error(_cli("validate", str(_write(tmp_path, ""))), "empty")
    binary = tmp_path / "garbage.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    _assert_one_line_error(_cli("validate", str(binary)))


def test_a_yaml_alias_bomb_is_refused(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8)
    )
    _assert_one_line_error(_cli("validate", str(_write(tmp_path, bomb))), "nodes")


def test_set_overrides_are_validated_and_unknown_paths_named(tmp_path):
    path = _scenario(tmp_path)
    _assert_one_line_error(_cli("validate", str(path), "--set", "training.lrr=0.1"), "training.lrr", "unknown key")
    _assert_one_line_error(_cli("validate", str(path), "--set", "training.lr=-1"), "training.lr")
    ok = _cli("validate", str(path), "--set", "training.lr=0.3", "--print")
    assert ok.returncode == 0 and "lr: 0.3" in ok.stdout


def test_missing_scenario_file_is_one_line(tmp_path):
    _assert_one_line_error(_cli("run", str(tmp_path / "nope.yaml")), "not found")


def test_workers_asking_for_more_gpus_than_exist_fail_before_training(ray_session, tmp_path, capsys):
    path = _scenario(tmp_path, executor__num_gpus=2, output__dir=str(tmp_path / "out"))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "executor.num_gpus" in err[0]
    assert not (tmp_path / "out").exists()


def test_too_many_fractional_gpu_workers_is_named(ray_session, tmp_path, capsys):
    path = _scenario(tmp_path, executor__num_gpus=0.25, executor__num_cpus=0, executor__num_workers=5)
    assert main(["run", str(path)]) == 2
    assert "executor.num_workers" in capsys.readouterr().err


NEEDS_A_CHECKPOINT = {"llm_lora_gpu.yaml"}  # names a Hub checkpoint; nothing can be downloaded here


def test_every_shipped_scenario_validates(capsys):
    for path in sorted((ROOT / "scenarios").rglob("*.yaml")):
        if path.name in NEEDS_A_CHECKPOINT:
            offline = _cli("validate", str(path))
            if offline.returncode != 0:  # no network and no local copy: the one-line error says what to do
                _assert_one_line_error(offline, "model.name_or_path", "network")
            code = main(["validate", str(path), "--set", "model.name_or_path=null"])  # the rest of the scenario
        else:
            code = main(["validate", str(path)])
        assert code == 0, f"{path}: {capsys.readouterr().err}"


def test_every_small_shipped_scenario_draws_its_partition():
    """Validation does not draw the partition; a Dirichlet split that leaves some client under ``min_size`` in
    every one of its 100 draws fails only when a run starts. The shipped personalization scenarios did (200
    clients at alpha 0.1). Drawn here for every scenario of built-in data up to 200,000 samples."""
    from raysim.data.load import load_data, partition_data
    from raysim.engine.validation import load_and_validate

    drawn, seen = 0, set()
    for path in sorted((ROOT / "scenarios").glob("*.yaml")):
        data = yaml.safe_load(path.read_text()).get("data", {})
        if data.get("source") not in ("synthetic", "digits") or data.get("num_samples", 0) > 200_000:
            continue
        scenario = load_and_validate(path)
        split = (repr(scenario.data), repr(scenario.partition), scenario.num_clients, scenario.seed)
        if split not in seen:  # many scenarios share the quickstart's split: each distinct one is drawn once
            seen.add(split)
            partition_data(scenario, load_data(scenario))  # raises the one-line ScenarioError when it cannot
        drawn += 1
    assert drawn >= 25 and len(seen) >= 8


@pytest.mark.parametrize("scenario, code", [("quickstart.yaml", 0), ("missing.yaml", 2)])
def test_the_command_ends_as_a_normal_exit_would(tmp_path, scenario, code):
    """``raysim.cli.entry`` skips only the interpreter's teardown: its exit code is ``main``'s, its output arrives
    whole through a pipe, and the ``atexit`` handlers (W&B's, logging's) and a non-daemon thread still finish."""
    marker = tmp_path / "marker"
    program = (
        "import atexit, sys, threading, time\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'a').write('atexit\\n'))\n"
        f"sys.argv = ['raysim', 'validate', {str(ROOT / 'scenarios' / scenario)!r}]\n"
        "from raysim.cli import entry\n"
        f"threading.Thread(target=lambda: (time.sleep(0.5), open({str(marker)!r}, 'a').write('thread\\n'))).start()\n"
        "entry()\n"
    )
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    if code == 0:
        assert proc.stdout == f"raysim: {ROOT / 'scenarios' / scenario} is a valid scenario (quickstart)\n"
    else:
        _assert_one_line_error(proc, "missing.yaml")
    assert marker.read_text() == "thread\natexit\n"
