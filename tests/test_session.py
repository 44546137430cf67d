"""``raysim.Session``: runs in a warm session reuse its workers and give the model a fresh process gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import ray
import yaml

import raysim
from raysim.engine.session import current


def _worker_pids() -> list[int]:
    pool = current()._pool
    return sorted(info["pid"] for info in ray.get([w.placement.remote() for w in pool.workers]))


def test_a_warm_session_reuses_its_workers_and_matches_a_fresh_process_bit_for_bit(ray_session, tiny_scenario, tmp_path):
    session = current()
    # Another scenario first, of the same resource shape: the workers must drop all of its state.
    other = {**tiny_scenario, "name": "other", "seed": 11, "strategy": {"name": "scaffold"},
             "model": {"kind": "mlp", "hidden": [8]}, "training": {"epochs": 2, "batch_size": 8, "lr": 0.3}}
    raysim.run(other)
    pools, pids = session.pools_started, _worker_pids()
    warm = raysim.run(tiny_scenario)
    assert session.pools_started == pools and _worker_pids() == pids  # the same two worker processes
    assert warm.summary["startup"]["ray (connected)"]["seconds"] < 0.1  # no ray.init in a warm session

    # The same scenario in a fresh `raysim run` process, whose new workers join the suite's Ray.
    session.discard()  # its workers hold the CPUs the child's workers need
    path = tmp_path / "fresh.yaml"
    path.write_text(yaml.safe_dump({**tiny_scenario, "output": {"dir": str(tmp_path / "fresh")}}))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "disabled"}
    child = subprocess.run([sys.executable, "-m", "raysim.cli", "run", str(path), "--address",
                            ray.get_runtime_context().gcs_address], env=env, capture_output=True, text=True, timeout=240)
    assert child.returncode == 0, child.stderr[-2000:]
    fresh = (tmp_path / "fresh" / tiny_scenario["name"] / "final_model.npy").read_bytes()
    assert (warm.run_dir / "final_model.npy").read_bytes() == fresh


def test_a_new_resource_shape_restarts_the_pool_and_the_same_shape_does_not(ray_session, tiny_scenario):
    session = current()
    raysim.run(tiny_scenario)
    pools = session.pools_started
    one = raysim.run(tiny_scenario, overrides=["executor.num_workers=1"])
    assert session.pools_started == pools + 1 and len(session._pool.workers) == 1
    again = raysim.run(tiny_scenario, overrides=["executor.num_workers=1", "seed=4"])
    assert session.pools_started == pools + 1
    assert not np.array_equal(one.global_vector, again.global_vector)  # the second run did train from its own seed


def test_the_driver_loads_a_run_without_importing_torch(tiny_scenario):
    """The driver's part of a run beside ``ray.init`` (checks, data, partition, the actors' classes) imports no
    torch: the pool's actors are ``WorkerActor`` shells, and each worker process imports its ``ClientWorker``."""
    code = (
        "import sys, json\n"
        "from raysim.config import parse_scenario\n"
        "from raysim.engine.runner import _load\n"
        "from raysim.engine.worker_actor import WorkerActor\n"
        f"_load(parse_scenario(json.loads({json.dumps(json.dumps(tiny_scenario))})))\n"
        "print(sorted(m for m in ('torch', 'opacus', 'transformers', 'peft', 'wandb', 'tenseal') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_the_worker_actor_forwards_every_remote_method_of_the_client_worker():
    import inspect

    from raysim.engine.worker import ClientWorker
    from raysim.engine.worker_actor import REMOTE_METHODS, WorkerActor

    local_only = {"local", "setup", "run_chunk"}  # a classmethod and two steps of the remote methods
    public = {name for name, _ in inspect.getmembers(ClientWorker, inspect.isfunction) if not name.startswith("_")}
    assert set(REMOTE_METHODS) == public - local_only
    assert all(callable(getattr(WorkerActor, name)) for name in REMOTE_METHODS)


def test_the_server_actor_runs_a_plain_run_without_importing_torch(ray_session, tiny_scenario):
    """The server actor's process imports no torch: a worker builds the initial model and the workers evaluate
    (here every round), so a run's start-up pays torch's imports in the workers alone."""
    session = current()
    session.discard()  # a fresh server actor, which no earlier run in the suite has touched
    result = raysim.run(tiny_scenario)
    assert all("accuracy" in m for m in result.history)  # evaluated every round
    host = session.server_host()
    assert ray.get(host.__ray_call__.remote(lambda _: sorted(m for m in ("torch", "opacus", "transformers")
                                                                if m in sys.modules))) == []


def test_a_session_that_started_ray_stops_it_only_after_the_server_actors_process_exits(ray_session, monkeypatch):
    """Closing a session that owns the embedded Ray kills the server actor and waits for its process before
    ``ray.shutdown``: a process still running when the raylet stops is SIGTERMed, and its exit can hang in Ray's
    own exit handlers, orphaned (about one run in 50 left one here). ``ray.kill`` alone returns before the
    process is gone."""
    import psutil

    from raysim.engine.session import Session

    session = Session()
    session.connected = session.owns_ray = True  # as if it had started the embedded Ray (the suite's stays up)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    pid = ray.get(session.server_host().process_id.remote())
    assert psutil.pid_exists(pid)
    session.close()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
