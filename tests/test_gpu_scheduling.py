"""Fractional GPUs are real scheduling resources: four 0.25-GPU workers fit one GPU, a fifth waits.

The suite's Ray session declares one GPU, real or not. On a host without CUDA the workers are granted
shares of that (fake) GPU and train on the CPU; on a CUDA host they train on ``cuda:0``, each capped
to its share of the device's memory. The tests marked ``needs_cuda`` run only on a CUDA host.
"""

import numpy as np
import pytest
import ray
import torch

from raysim.config import parse_scenario
from raysim.engine.cluster import plan_workers
from raysim.engine.pool import WorkerPool

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
EXPECTED_DEVICE = "cuda:0" if HAS_CUDA else "cpu"  # what pick_device gives a worker with a GPU share


def test_four_quarter_gpu_workers_start_and_a_fifth_waits(free_cluster):
    scenario = parse_scenario({"model": {"kind": "logreg"}, "executor": {"num_cpus": 0, "num_gpus": 0.25}})
    workers = WorkerPool(scenario.executor, 5).workers  # created at once; each starts when a share is free
    try:
        calls = [w.placement.remote() for w in workers]
        ready, pending = ray.wait(calls, num_returns=4, timeout=120)
        assert len(ready) == 4
        late, pending = ray.wait(pending, timeout=5)
        assert not late and len(pending) == 1  # no quarter of the GPU is left for it
        placements = ray.get(ready)
        assert all(p["gpu_ids"] for p in placements)  # each worker was granted a share of the one GPU
        assert len({tuple(p["gpu_ids"]) for p in placements}) == 1  # the same GPU for all four
        assert [p["device"] for p in placements] == [EXPECTED_DEVICE] * 4  # cuda when there is one
        ray.kill(workers[0])
        ready, _ = ray.wait(pending, timeout=120)
        assert ready, "the fifth worker should start once a quarter GPU is free"
    finally:
        for w in workers:
            ray.kill(w)


def test_plan_workers_counts_fractional_gpus():
    executor = parse_scenario({"executor": {"num_cpus": 0, "num_gpus": 0.25}}).executor
    assert plan_workers(executor, {"CPU": 2.0, "GPU": 1.0}) == 4
    executor = parse_scenario({"executor": {"num_cpus": 1, "num_gpus": 0.25}}).executor
    assert plan_workers(executor, {"CPU": 2.0, "GPU": 1.0}) == 2


@needs_cuda
def test_a_quarter_gpu_worker_is_capped_to_its_share_of_device_memory(free_cluster):
    """pick_device caps the worker's CUDA allocator to its fraction: an allocation beyond it raises
    OutOfMemoryError inside that worker only, which then still works, and a worker within its share
    allocates at the same time."""

    @ray.remote(num_cpus=0, num_gpus=0.25)
    class Probe:
        def __init__(self):
            from raysim.engine.worker import pick_device

            self.device = pick_device(0.25)
            self.total = torch.cuda.get_device_properties(self.device).total_memory

        def allocate(self, share: float) -> str:
            try:
                block = torch.empty(int(share * self.total), dtype=torch.uint8, device=self.device)
                block.fill_(1)
                torch.cuda.synchronize(self.device)
                del block
                return "ok"
            except torch.cuda.OutOfMemoryError:
                return "oom"
            finally:
                torch.cuda.empty_cache()

        def fraction(self) -> float:
            return torch.cuda.get_per_process_memory_fraction(self.device)

    free, total = torch.cuda.mem_get_info(0)
    if free < 0.4 * total:
        pytest.skip(f"the GPU has only {free / 2**30:.1f} GiB free; the check needs 40% of it")
    probes = [Probe.remote() for _ in range(2)]
    try:
        assert ray.get([p.fraction.remote() for p in probes]) == pytest.approx([0.25, 0.25])
        over, within = ray.get([probes[0].allocate.remote(0.30), probes[1].allocate.remote(0.10)])
        assert (over, within) == ("oom", "ok")  # 30% of the device is over a quarter share, 10% is not
        assert ray.get(probes[0].allocate.remote(0.10)) == "ok"  # the capped worker still runs
    finally:
        for p in probes:
            ray.kill(p)


@needs_cuda
def test_a_run_on_quarter_gpu_workers_trains_on_cuda_like_the_cpu(ray_session, tiny_scenario):
    """The same scenario on two 0.25-GPU workers and on two CPU workers: close final models."""
    import raysim

    gpu = dict(tiny_scenario, name="tiny_gpu", executor={**tiny_scenario["executor"], "num_gpus": 0.25})
    on_gpu, on_cpu = raysim.run(gpu), raysim.run(tiny_scenario)
    assert on_gpu.summary["workers"] == 2
    a, b = on_gpu.global_vector.astype(np.float64), on_cpu.global_vector.astype(np.float64)
    assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(b)  # float32 kernels differ; 3 rounds stay close
    assert abs(on_gpu.final_accuracy - on_cpu.final_accuracy) <= 0.02
