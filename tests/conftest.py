"""One Ray session for the whole suite (raysim's embedded Ray: 2 CPUs, one fake GPU, a capped object store) and one
warm ``raysim.Session`` on it."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session():
    """The suite's Ray, with one ``raysim.Session`` entered: runs reuse its warm workers and server actor."""
    import ray

    from raysim.engine.cluster import start_local
    from raysim.engine.session import Session

    if not ray.is_initialized():  # the embedded Ray as raysim starts it (no monitor, log monitor or API server)
        start_local(num_cpus=2, num_gpus=1, object_store_memory=400 * 1024**2, log_to_driver=False)
    with Session():
        yield ray
    ray.shutdown()


@pytest.fixture
def free_cluster(ray_session):
    """For a test that starts its own actors or child runs on the suite's Ray: the warm session's actors stop
    first, so their CPUs are free."""
    from raysim.engine.session import current

    current().discard()
    return ray_session


@pytest.fixture
def tiny_scenario(tmp_path):
    """A small but real scenario: 200 Dirichlet clients on synthetic data, an MLP, 3 rounds."""
    return {
        "name": "tiny", "seed": 3, "num_clients": 200, "rounds": 3,
        "data": {"source": "synthetic", "num_samples": 12000, "num_features": 16, "num_classes": 5},
        "partition": {"kind": "dirichlet", "alpha": 0.5, "min_size": 5},
        "sampling": {"clients_per_round": 20},
        "model": {"kind": "mlp", "hidden": [32]},
        "training": {"epochs": 1, "batch_size": 16, "lr": 0.1},
        "executor": {"num_workers": 2, "clients_per_call": 3},
        "tracking": {"progress": False},
        "output": {"dir": str(tmp_path / "results")},
    }
