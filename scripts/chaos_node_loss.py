"""Node loss: a run on a two-node Ray cluster loses a node mid-run and must still give the model of
a single-node run, bit for bit.

Two local Ray nodes of one CPU each (``ray.cluster_utils.Cluster``: separate raylets, object stores
and worker processes, on one machine) host one worker actor each. After round 3 the second node is
removed without warning. Its worker's calls move to the surviving worker, and the run goes on with
one worker while the lost one waits for room; with ``--replace``, a new node joins a few seconds
later (as an autoscaler would replace a preempted machine), where Ray can restart the lost worker;
the engine sends it calls again once it answers a probe. The last line is ``node_loss_ok: true|false``.

    python scripts/chaos_node_loss.py [--replace]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path


def scenario(out: str) -> dict:
    return {
        "name": "node-loss", "seed": 3, "num_clients": 200, "rounds": 12,
        "data": {"source": "synthetic", "num_samples": 12000, "num_features": 16, "num_classes": 5},
        "partition": {"kind": "dirichlet", "alpha": 0.5, "min_size": 5}, "sampling": {"clients_per_round": 20},
        "model": {"kind": "mlp", "hidden": [32]}, "training": {"epochs": 1, "batch_size": 16, "lr": 0.1},
        "executor": {"num_workers": 2, "num_cpus": 1, "clients_per_call": 3},
        "faults": {"delay_worker": 0, "delay_seconds": 0.2},  # rounds long enough to lose a node during one
        "tracking": {"progress": False, "wandb": "disabled"}, "output": {"dir": out},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replace", action="store_true", help="add a replacement node after the loss")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import numpy as np
    import ray
    import ray._private.utils
    from ray._private import state
    from ray.cluster_utils import Cluster

    import raysim

    ray._private.utils.write_ray_address = lambda *a, **k: None  # keep the test cluster private
    with tempfile.TemporaryDirectory() as out:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        reference = raysim.run(scenario(out + "/one")).global_vector
        ray.shutdown()

        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "include_dashboard": False, "object_store_memory": 100 * 2**20})
        doomed = cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)
        cluster.wait_for_nodes()
        outcome: dict = {}
        runner = threading.Thread(target=lambda: outcome.update(
            result=raysim.run(scenario(out + "/two"), address=cluster.address)))
        runner.start()
        metrics = Path(out) / "two" / "node-loss" / "metrics.jsonl"
        while runner.is_alive() and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
            time.sleep(0.05)
        nodes_before = len([a for a in state.actors().values() if a["ActorClassName"] == "WorkerActor"
                            and a["State"] == "ALIVE"])
        cluster.remove_node(doomed, allow_graceful=False)
        lost_at = len(metrics.read_text().splitlines())
        print(f"node_loss: removed the second node after round {lost_at} ({nodes_before} workers were alive)")
        if args.replace:
            time.sleep(3)
            cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)
            print("node_loss: added a replacement node")
        runner.join(timeout=600)
        result = outcome.get("result")
        ray.shutdown()
        cluster.shutdown()
    reasons = []
    if result is None:
        reasons.append("the run did not finish")
    else:
        final = result.summary["final"]
        print(f"node_loss: {len(result.history)} rounds, worker failures {final.get('worker_failures_total')}, "
              f"accuracy {result.final_accuracy:.4f}")
        if not np.array_equal(result.global_vector, reference):
            reasons.append("the model differs from the single-node run")
        if not final.get("worker_failures_total"):
            reasons.append("no worker failure was recorded")
    print("node_loss_ok: " + ("true (bit-identical to the single-node run)" if not reasons else f"false ({'; '.join(reasons)})"))


if __name__ == "__main__":
    main()
