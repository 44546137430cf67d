"""Reliability: checkpoints and bit-identical resume after SIGKILL and SIGTERM, workers killed mid-round,
the retry budget, and injected client faults that must never poison the global model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import raysim
from raysim.cli import main
from raysim.config import parse_scenario
from raysim.engine import checkpoint
from raysim.engine.runner import _deferred_signals, execute
from raysim.errors import ScenarioError

pytestmark = pytest.mark.usefixtures("ray_session")


def _final(result) -> np.ndarray:
    return np.load(result.run_dir / "final_model.npy")


_REFERENCES: dict[str, raysim.Result] = {}


def _reference(tmp_path: Path, raw: dict) -> raysim.Result:
    """The uninterrupted, fault-free run of ``raw``, run once per test session (how often it checkpoints
    never changes the model, so runs that differ only there share it)."""
    key = json.dumps({k: v for k, v in raw.items() if k not in ("output", "checkpoint")}, sort_keys=True)
    if key not in _REFERENCES:
        _REFERENCES[key] = raysim.run(parse_scenario({**raw, "output": {"dir": str(tmp_path / "reference")}}))
    return _REFERENCES[key]


def _metrics_rounds(run_dir: Path) -> list[int]:
    return [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _start_run(tmp_path: Path, raw: dict, *flags: str) -> tuple[subprocess.Popen, Path]:
    """``raysim run`` in a child process attached to the test's Ray cluster; returns it and its run folder.
    The warm session's actors stop first: the child's workers need their CPUs."""
    import ray

    from raysim.engine.session import current

    current().discard()

    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-m", "raysim.cli", "run", str(path), "--address", ray.get_runtime_context().gcs_address, *flags],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return child, Path(raw["output"]["dir"]) / raw["name"]


def _wait_for_rounds(child: subprocess.Popen, run_dir: Path, rounds: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= rounds:
            return
        if child.poll() is not None:
            raise AssertionError(f"the run ended early ({child.returncode}): {child.stderr.read()[-2000:]}")
        time.sleep(0.05)
    child.kill()
    raise AssertionError(f"no {rounds} rounds within {timeout}s")


def _session_processes() -> list:
    """The processes of this test session's Ray node (not another session's on the same machine)."""
    import psutil
    import ray

    return psutil.Process(ray._private.worker._global_node.all_processes["raylet"][0].process.pid).children(recursive=True)


def _wait_for_the_server_actor_to_end(timeout: float = 60.0) -> None:
    """Until the session's server actor process is gone: Ray ends a dead driver's actors only after it notices,
    and the warm session's own server actor was stopped before the child started (``_start_run``)."""
    deadline = time.monotonic() + timeout
    while any("ServerHost" in " ".join(_cmdline(p)) for p in _session_processes()):
        assert time.monotonic() < deadline, "the dead run's server actor is still running"
        time.sleep(0.1)


def _cmdline(process) -> list[str]:
    import psutil

    try:
        return process.cmdline()
    except psutil.Error:
        return []


def _slow(raw: dict) -> dict:
    """The same run, with every train call delayed (a delay never changes a result)."""
    return {**raw, "faults": {"delay_worker": 0, "delay_seconds": 0.15}}


def test_an_async_run_killed_with_sigkill_resumes_to_a_bit_identical_model(tmp_path, tiny_scenario):
    raw = {**tiny_scenario, "rounds": 6, "checkpoint": {"every": 2},
           "system": {"speed": {"kind": "lognormal", "mean": 10, "sigma": 1}},
           "asynchronous": {"mode": "fedbuff", "concurrency": 12, "buffer_size": 4}}
    reference = _reference(tmp_path, raw).global_vector

    child, run_dir = _start_run(tmp_path, _slow(raw))
    _wait_for_rounds(child, run_dir, 3)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    _wait_for_the_server_actor_to_end()  # a checkpoint the dead driver asked for may still be being written
    saved = checkpoint.latest(run_dir)
    assert saved is not None and saved.rounds_done in (2, 4)

    resumed = execute(parse_scenario(_slow(raw)), resume=run_dir)
    assert resumed.summary["resumed_after_round"] == saved.rounds_done
    np.testing.assert_array_equal(_final(resumed), reference)
    assert _metrics_rounds(run_dir) == [1, 2, 3, 4, 5, 6]  # no duplicated or torn line


def test_sigterm_then_sigint_mid_run_and_resume_give_a_bit_identical_model(tmp_path, tiny_scenario):
    """SIGTERM exits 143 and SIGINT 130, each after checkpointing the rounds in flight (the one running and the
    one asked for ahead; a SIGKILLed run, which leaves only the periodic checkpoints, is the async test above)."""
    raw = {**tiny_scenario, "rounds": 8, "checkpoint": {"every": 7}}  # periodic checkpoints would hide missing ones
    reference = _reference(tmp_path, raw).global_vector
    child, run_dir = _start_run(tmp_path, _slow(raw))
    _wait_for_rounds(child, run_dir, 1)
    child.send_signal(signal.SIGTERM)  # finishes the round in flight, checkpoints it, exits 143
    _, err = child.communicate(timeout=60)
    assert child.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "raysim resume" in err and "stopped by SIGTERM" in err
    stopped = checkpoint.latest(run_dir)
    assert stopped is not None and 1 <= stopped.rounds_done == len(_metrics_rounds(run_dir)) < 4

    child, _ = _start_run(tmp_path, _slow(raw), "--resume")
    _wait_for_rounds(child, run_dir, stopped.rounds_done + 1)
    child.send_signal(signal.SIGINT)  # Ctrl-C: the same, exit 130
    _, err = child.communicate(timeout=60)
    assert child.returncode == 128 + signal.SIGINT == 130, err
    assert "Traceback" not in err and "stopped by SIGINT" in err and "raysim resume" in err
    saved = checkpoint.latest(run_dir)
    assert saved is not None and stopped.rounds_done < saved.rounds_done == len(_metrics_rounds(run_dir)) < 7

    resumed = execute(parse_scenario(_slow(raw)), resume=run_dir)
    assert resumed.summary["resumed_after_round"] == saved.rounds_done
    np.testing.assert_array_equal(_final(resumed), reference)
    assert _metrics_rounds(run_dir) == [1, 2, 3, 4, 5, 6, 7, 8]  # no duplicated or torn line
    assert main(["resume", str(run_dir)]) == 2  # a finished run has nothing to resume


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_first_signal_only_sets_the_flag_and_a_second_stops_at_once(signum, capsys):
    """``_deferred_signals`` in this process: the first signal is noted; the second goes to the handler that was
    installed before (for SIGINT Python's KeyboardInterrupt, which ``raysim`` turns into exit 130)."""

    class Stopped(Exception):
        pass

    def stop_now(received, frame):
        raise Stopped(received)

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    other = signal.SIGTERM if signum == signal.SIGINT else signal.SIGINT
    before = signal.default_int_handler if signum == signal.SIGINT else stop_now
    expected = KeyboardInterrupt if signum == signal.SIGINT else Stopped
    try:
        signal.signal(signum, before)
        signal.signal(other, stop_now)
        reached = []
        with pytest.raises(expected):
            with _deferred_signals() as caught:
                assert signal.getsignal(signum) is not before
                os.kill(os.getpid(), signum)
                time.sleep(0.01)  # the handler runs in the main thread before this returns
                reached.append(dict(caught))
                os.kill(os.getpid(), signum)
                time.sleep(0.01)
                reached.append("not stopped")
        assert reached == [{"signum": signum}]
        assert signal.getsignal(signum) is before and signal.getsignal(other) is stop_now  # restored on the way out
        assert f"raysim: {signal.Signals(signum).name}: finishing the round" in capsys.readouterr().err
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_a_worker_process_killed_from_outside_is_restarted_and_its_calls_rerun(tmp_path, tiny_scenario):
    raw = {**tiny_scenario, "rounds": 6, "checkpoint": {"every": 2}}
    reference = _reference(tmp_path, raw).global_vector
    outcome: dict = {}
    scenario = parse_scenario({**_slow(raw), "output": {"dir": str(tmp_path / "killed")}})
    runner = threading.Thread(target=lambda: outcome.update(result=raysim.run(scenario)))
    runner.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and runner.is_alive():
        training = [p for p in _session_processes() if "WorkerActor.train" in " ".join(_cmdline(p))]
        if training:
            killed = training[0].pid
            training[0].kill()
        time.sleep(0.05)
    runner.join(timeout=300)
    assert killed is not None, "no worker was caught training"
    result = outcome["result"]
    np.testing.assert_array_equal(result.global_vector, reference)
    assert result.summary["final"]["worker_failures_total"] >= 1


def test_secure_rounds_that_lose_a_worker_are_rerun_to_the_same_model(tmp_path, tiny_scenario):
    raw = {**tiny_scenario, "rounds": 2, "secure_aggregation": {"threshold": 0.6},
           "executor": {"num_workers": 2, "clients_per_call": 20}}  # one call per round, to the first worker
    reference = _reference(tmp_path, raw)
    # The first worker dies at its second call, in round 2; the round starts over on the restarted worker.
    faulty = raysim.run(parse_scenario({**raw, "faults": {"kill_worker_every": 2}, "output": {"dir": str(tmp_path / "f")}}))
    np.testing.assert_array_equal(faulty.global_vector, reference.global_vector)
    assert faulty.summary["final"]["worker_failures_total"] >= 1


def test_the_retry_budget_stops_the_run_with_one_line_and_keeps_its_checkpoints(tmp_path, tiny_scenario, capsys):
    # One worker, one call a round (its pack of the round's 7 chunks): it dies at its 2nd call, in round 2, after round 1.
    raw = {**tiny_scenario, "rounds": 6, "checkpoint": {"every": 1}, "executor": {**tiny_scenario["executor"],
           "num_workers": 1, "max_worker_failures": 0}, "faults": {"kill_worker_every": 2}}
    path = tmp_path / "budget.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "executor.max_worker_failures" in err[0], err
    run_dir = Path(raw["output"]["dir"]) / "tiny"
    assert _metrics_rounds(run_dir) == [1]
    saved = checkpoint.latest(run_dir)
    assert saved is not None and saved.rounds_done == 1


def test_non_finite_updates_are_rejected_and_the_round_goes_on_without_them(tmp_path, tiny_scenario):
    raw = {**tiny_scenario, "rounds": 2}
    crashed = _reference(tmp_path, {**raw, "faults": {"client_error_fraction": 0.15}})
    # The same 15% of clients (fault draws are per client, not per worker), now sending NaN or Inf.
    poisoned = raysim.run(parse_scenario({**raw, "faults": {"nan_fraction": 0.1, "inf_fraction": 0.05},
                                          "executor": {"num_workers": 1, "clients_per_call": 4},
                                          "output": {"dir": str(tmp_path / "p")}}))
    assert np.isfinite(poisoned.global_vector).all()
    assert poisoned.summary["final"]["rejected_total"] == crashed.summary["final"]["client_errors_total"] > 0
    np.testing.assert_array_equal(poisoned.global_vector, crashed.global_vector)


def test_a_norm_bound_rejects_huge_updates(tmp_path, tiny_scenario):
    raw = {**tiny_scenario, "rounds": 2}
    crashed = _reference(tmp_path, {**raw, "faults": {"client_error_fraction": 0.15}})
    huge = {"faults": {"huge_fraction": 0.15}}
    rejected = raysim.run(parse_scenario({**raw, **huge, "aggregation": {"norm_bound": 1e3, "norm_bound_action": "reject"},
                                          "output": {"dir": str(tmp_path / "r")}}))
    np.testing.assert_array_equal(rejected.global_vector, crashed.global_vector)
    assert rejected.summary["final"]["norm_bounded"] > 0


def test_fault_fractions_over_one_are_refused():
    with pytest.raises(ScenarioError, match="faults.client_error_fraction"):
        parse_scenario({"faults": {"nan_fraction": 0.6, "client_error_fraction": 0.6}})


def test_resuming_restores_disk_client_state_stores_and_optimizer_state(tmp_path, tiny_scenario):
    extra = {"strategy": {"name": "scaffold", "state_store": "disk", "server_lr": 0.5}, "num_clients": 40,
             "compression": {"kind": "topk", "fraction": 0.1, "error_feedback": True}}  # two disk stores
    raw = {**tiny_scenario, "rounds": 4, "checkpoint": {"every": 2}, **extra}
    whole = raysim.run(parse_scenario(raw))
    (whole.run_dir / "summary.json").unlink()
    resumed = execute(parse_scenario(raw), resume=whole.run_dir)  # from the checkpoint after round 2
    assert resumed.summary["resumed_after_round"] == 2
    np.testing.assert_array_equal(resumed.global_vector, whole.global_vector)
    assert _metrics_rounds(whole.run_dir) == [1, 2, 3, 4]


def test_resume_refuses_a_different_scenario_or_a_folder_without_a_run(tmp_path, tiny_scenario, capsys):
    from raysim.config import scenario_to_yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_scenario))
    run_dir = Path(tiny_scenario["output"]["dir"]) / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(scenario_to_yaml(parse_scenario(tiny_scenario)))
    assert main(["run", str(path), "--resume", "--set", "training.lr=0.5"]) == 2
    assert main(["resume", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "--resume: training differs" in lines[0] and "config.yaml is missing" in lines[1]
