"""The cloud cluster: cluster configs that `ray up` accepts, a bounded failure for an unreachable
address, and a run across two Ray nodes that matches the single-node run exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_CONFIGS = [ROOT / "cluster.yaml", ROOT / "cluster-gcp.yaml"]


def _ray_schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_cluster_config_matches_the_schema_shipped_with_ray(path):
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, _ray_schema())
    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types
    workers = {name: spec for name, spec in node_types.items() if name != config["head_node_type"]}
    assert any(spec["resources"].get("GPU", 0) >= 1 for spec in workers.values())
    assert node_types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert sum(spec.get("min_workers", 0) for spec in workers.values()) <= config["max_workers"]
    for spec in workers.values():
        assert spec.get("min_workers", 0) <= spec["max_workers"] <= config["max_workers"]


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_cluster_config_installs_raysim_from_the_mounted_checkout(path):
    config = yaml.safe_load(path.read_text())
    mounts = config["file_mounts"]
    for local in mounts.values():
        assert (ROOT / local).exists(), f"file_mounts source {local} is not in the repository"
    assert (ROOT / mounts["~/raysim"] / "pyproject.toml").is_file()
    assert (ROOT / mounts["~/scenarios"] / "quickstart.yaml").is_file()
    assert any("pip install" in cmd and "~/raysim" in cmd for cmd in config["setup_commands"])
    text = path.read_text().lower()
    for secret in ("aws_secret_access_key", "aws_access_key_id", "private_key", "wandb_api_key"):
        assert secret not in text


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 40) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "raysim.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    return proc, time.monotonic() - start


@pytest.mark.parametrize("how", ["--address", "RAY_ADDRESS"])
def test_an_unreachable_cluster_is_one_line_within_seconds(how, tmp_path):
    address = "127.0.0.1:1"
    args = ["run", str(ROOT / "scenarios" / "quickstart.yaml"), "--set", f"output.dir={tmp_path}"]
    if how == "--address":
        proc, seconds = _cli(*args, "--address", address)
    else:
        proc, seconds = _cli(*args, env={"RAY_ADDRESS": address})
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert address in lines[0] and "--address" in lines[0]
    assert seconds < 30
    assert not any(tmp_path.iterdir())


_RUN_ON = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import ray, ray._private.utils
    from ray._private import state
    from ray.cluster_utils import Cluster
    import raysim

    # Cluster() would record itself in /tmp/ray/ray_current_cluster, where any other ray.init() on
    # this machine would find and join it; keep the test cluster private.
    ray._private.utils.write_ray_address = lambda *args, **kwargs: None
    mode, scenario, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    if mode == "two-nodes":
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "include_dashboard": False, "object_store_memory": 80 * 2**20})
        cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
        cluster.wait_for_nodes()
        try:
            result = raysim.run(scenario, address=cluster.address)
            nodes = [a["Address"]["NodeID"] for a in state.actors().values() if a["ActorClassName"] == "WorkerActor"]
            alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        finally:
            ray.shutdown()
            cluster.shutdown()
    else:
        result = raysim.run(scenario)
        nodes, alive = [], []
    np.save(out + ".npy", result.global_vector)
    with open(out + ".json", "w") as handle:
        json.dump({"worker_nodes": nodes, "nodes": alive}, handle)
    """
)


def _run_on(mode: str, scenario: dict, out: Path) -> tuple[np.ndarray, dict]:
    proc = subprocess.run([sys.executable, "-c", _RUN_ON, mode, json.dumps(scenario), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(str(out) + ".npy"), json.loads(Path(str(out) + ".json").read_text())


def test_a_run_across_two_nodes_uses_both_and_equals_the_single_node_run(ray_session, tiny_scenario, tmp_path):
    import raysim

    scenario = {**tiny_scenario, "executor": {"num_workers": 2, "num_cpus": 1, "clients_per_call": 3}}
    scenario["tracking"] = {"progress": False, "wandb": "disabled"}
    two_nodes, placement = _run_on("two-nodes", scenario, tmp_path / "two-nodes")
    assert len(placement["nodes"]) == 2
    assert sorted(placement["worker_nodes"]) == sorted(placement["nodes"])
    one_node = raysim.run({**scenario, "output": {"dir": str(tmp_path / "one-node")}}).global_vector  # the session's node
    assert np.array_equal(two_nodes, one_node)


def test_the_embedded_ray_starts_without_the_monitor_the_log_monitor_and_the_api_server(ray_session):
    """raysim's embedded Ray (``cluster.start_local``, which the suite's session uses too) runs the GCS, the raylet
    and its agents, the dashboard agent minimal, and none of the three head processes a one-machine simulation
    never uses."""
    import psutil

    session_dir = ray._private.worker._global_node.get_session_dir_path()
    scripts = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if session_dir in cmdline:
            scripts.append(cmdline)
    running = " ".join(scripts)
    assert "gcs_server" in running and "raylet" in running  # the check sees this session's processes
    for script in ("autoscaler/_private/monitor.py", "_private/log_monitor.py", "dashboard/dashboard.py"):
        assert script not in running
    agents = [cmdline for cmdline in scripts if "dashboard/agent.py" in cmdline]
    assert len(agents) == 1 and "--minimal" in agents[0].split()


def test_the_embedded_ray_returns_a_packs_partial_sums_inline(ray_session):
    """A result the size of a sync pack's partial sums (five float64 sums of a 9,610-parameter MLP: 385 KB)
    comes back inside the call's reply, into the caller's memory store, not through the object store
    (``cluster.DIRECT_RESULT_BYTES``; Ray's default of 100 KiB sends it through the store)."""
    from raysim.engine.cluster import DIRECT_RESULT_BYTES

    @ray.remote(num_cpus=0)
    def partial_sums() -> np.ndarray:
        return np.zeros((5, 9_610))

    memory_store = ray._private.worker.global_worker.core_worker
    before = memory_store.get_local_memory_store_bytes_used()
    result = partial_sums.remote()
    assert ray.get(result).nbytes == 5 * 9_610 * 8 < DIRECT_RESULT_BYTES
    assert memory_store.get_local_memory_store_bytes_used() - before >= 5 * 9_610 * 8


def test_the_embedded_ray_records_no_task_events(ray_session):
    """Task events are off in the embedded Ray (``task_events_report_interval_ms: 0``): nothing reads them there,
    and flushing them held the driver's ``ray.shutdown`` 0.25 s. ``ray.timeline()`` flushes and reads them; with
    Ray's default it returns this call's events."""

    @ray.remote(num_cpus=0)
    def one() -> int:
        return 1

    assert ray.get(one.remote()) == 1
    assert ray.timeline() == []


def test_await_exit_kills_a_process_stuck_in_its_exit_and_lets_one_that_ends_go():
    """A worker process SIGTERMed by a stopping raylet can hang in Ray's C++ exit handlers and outlive it; before
    stopping the embedded Ray the session waits for the server actor's process and SIGKILLs it past the deadline.
    A process that ignores SIGTERM stands in for the hung one; one that ends by itself is waited for (its
    zombie counts as ended) and not killed."""
    from raysim.engine.cluster import await_exit

    stuck = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                              "print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert stuck.stdout.readline().strip() == "ready"
    stuck.terminate()
    start = time.monotonic()
    assert await_exit(stuck.pid, seconds=0.3) is True
    assert stuck.wait(timeout=10) == -9  # SIGKILL
    assert 0.3 <= time.monotonic() - start < 10

    ending = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    start = time.monotonic()
    assert await_exit(ending.pid, seconds=20) is False
    assert time.monotonic() - start < 10  # returned at its exit, not at the deadline
    assert ending.wait(timeout=10) == 0
    assert await_exit(ending.pid, seconds=1) is False  # reaped: no such process
