#!/usr/bin/env python
"""GPU readiness: one unattended command of a few minutes on a machine with one CUDA GPU.

    python scripts/gpu_check.py [--rounds 50] [--lora-rounds 2] [--output DIR] [--timeout 540]

Run it from the repository root (it reads scenarios/quickstart.yaml and scenarios/llm_lora_cpu.yaml).
It prints one ``name: value`` line per measurement and per check, and ends with ``gpu_check_ok: true``
or ``gpu_check_ok: false``; it exits 0 when every check passed, 1 when one failed (or crashed, or the
whole run went past ``--timeout``), and 2 with one line when there is no CUDA device.

The checks (each ``check_*`` line is true or false):

1. ``check_quarter_gpu_placement``: four ``executor.num_gpus: 0.25`` worker actors (the engine's own
   ``ClientWorker``, started by ``raysim.engine.pool.create_workers``) are four processes on the same
   GPU, each on ``cuda:0`` with its CUDA allocator capped to 0.25. ``check_quarter_gpu_concurrent``:
   their train calls, each a chunk of quickstart clients, run at the same time (every call starts
   before any of them ends) and return finite updates.
2. ``check_memory_cap``: while three of those workers each hold 5% of the device, the fourth asks for
   30% (over its 25% share, but well within the free memory): it gets ``torch.cuda.OutOfMemoryError``
   inside that worker only; then all four, the one that hit the cap included, train again.
3. ``check_quickstart_cuda_matches_cpu``: the quickstart on four 0.25-GPU workers against the same on
   four CPU workers. Tolerances: the round-1 training loss within 1e-4 relative, final accuracy within 1
   percentage point, the final models within 5% relative L2 distance (float32 kernels differ between
   devices, so the runs are close, not bit-identical). ``check_cpu_worker_count_bit_identical``: the
   CPU run with 4 workers and with one per core give the same model bit for bit (the engine's fixed
   reduction order).
4. ``check_lora_bf16_dtypes``: the LoRA scenario (scenarios/llm_lora_cpu.yaml) on a 0.25-GPU worker
   holds its frozen base in bfloat16 and its trainable adapters (and head) in float32, and runs under
   bf16 autocast. ``check_lora_bf16_runs``: two rounds of it through ``raysim.run`` on four 0.25-GPU
   workers give a finite perplexity within 10% of the same rounds on four CPU workers (float32).
5. Throughput: clients per second of the quickstart rounds (after the first) on four 0.25-GPU workers,
   four CPU workers and one CPU worker per core (at most 32); tokens per second per worker of the LoRA
   rounds. These are reported, not checked: a small MLP is launch-bound on a GPU.
6. ``check_vectorized_cuda_matches_sequential``: the quickstart with ``training.vectorize: true`` on four
   0.25-GPU workers against the same sequential, within 1e-4 relative L2 (issue 17).
   ``check_vectorized_cuda_worker_count_bit_identical``: vectorized on four and on one 0.25-GPU worker,
   bit for bit (cuBLAS's batched matmuls, whatever the stack). Reported: ``vectorize_speedup_gpu_1000``,
   client-steps per second of one chunk of 1,000 quickstart clients, vectorized against sequential, on
   ``cuda:0`` in this process.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from raysim.errors import first_line

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
LORA = ROOT / "scenarios" / "llm_lora_cpu.yaml"

# Tolerances of check 3 and 4 (see the module docstring).
ROUND1_LOSS_RTOL = 1e-4
ACCURACY_POINTS = 1.0
MODEL_RTOL = 0.05
LORA_PERPLEXITY_RTOL = 0.10

CHECKS = ("check_quarter_gpu_placement", "check_quarter_gpu_concurrent", "check_memory_cap",
          "check_quickstart_cuda_matches_cpu", "check_cpu_worker_count_bit_identical", "check_lora_bf16_dtypes",
          "check_lora_bf16_runs", "check_vectorized_cuda_matches_sequential",
          "check_vectorized_cuda_worker_count_bit_identical")
MAX_CPU_WORKERS = 32  # the CPU run with "one worker per core" stops here on very large hosts

failures: list[str] = []
reported: set[str] = set()


def report(name: str, value: object) -> None:
    if isinstance(value, bool):
        value = "true" if value else "false"
    elif isinstance(value, float):
        value = f"{value:.6g}"
    print(f"{name}: {value}", flush=True)


def check(name: str, ok: bool, detail: str = "") -> bool:
    reported.add(name)
    report(name, bool(ok))
    if detail:
        report(f"{name}_detail", detail)
    if not ok:
        failures.append(name)
    return bool(ok)


def one_line(err: BaseException) -> str:
    cause = getattr(err, "cause", None)  # a RayTaskError: name the worker's own exception
    return first_line(cause if isinstance(cause, BaseException) else err, 200)


class Timeout(Exception):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=50, help="quickstart rounds per device (default 50)")
    parser.add_argument("--lora-rounds", type=int, default=2, help="LoRA rounds per device (default 2)")
    parser.add_argument("--clients-per-call", type=int, default=200,
                        help="quickstart clients per timed train call in checks 1 and 2 (default 200)")
    parser.add_argument("--output", type=Path, default=None, help="where the runs write (default: a temporary folder, removed)")
    parser.add_argument("--timeout", type=float, default=540.0,
                        help="give up after this many seconds, still printing the verdict (default 540)")
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.lora_rounds < 1 or args.clients_per_call < 1 or args.timeout <= 0:
        parser.error("--rounds must be >= 2, --lora-rounds and --clients-per-call >= 1, --timeout > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the embedded local Ray of this version needs it
    os.environ["WANDB_MODE"] = "disabled"
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
              "run it on a machine with a GPU", file=sys.stderr)
        return 2

    def on_alarm(signum, frame):
        raise Timeout(f"gave up after --timeout {args.timeout:g} s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(args.timeout))
    started = time.perf_counter()
    out_dir = args.output or Path(tempfile.mkdtemp(prefix="raysim-gpu-check-"))
    try:
        run_checks(args, out_dir)
    except Timeout as err:
        check("gpu_check_finished", False, str(err))
    except Exception as err:  # a crash outside any one check: still end with the verdict line
        check("gpu_check_finished", False, one_line(err))
    finally:
        signal.alarm(0)
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception:
            pass
        if args.output is None:
            import shutil

            shutil.rmtree(out_dir, ignore_errors=True)
    for name in CHECKS:  # a check that a crash or the timeout kept from running is a failure too
        if name not in reported:
            check(name, False, "not reached")
    report("gpu_check_seconds", time.perf_counter() - started)
    if failures:
        report("gpu_check_failed", ", ".join(failures))
    report("gpu_check_ok", not failures)
    return 1 if failures else 0


def run_checks(args: argparse.Namespace, out_dir: Path) -> None:
    import ray
    import torch

    from raysim.engine.cluster import start_local

    props = torch.cuda.get_device_properties(0)
    report("torch", torch.__version__)
    report("torch_cuda", torch.version.cuda)
    report("ray", ray.__version__)
    report("gpu_name", props.name)
    report("gpu_count", torch.cuda.device_count())
    report("gpu_memory_gib", props.total_memory / 2**30)
    report("gpu_bf16_supported", torch.cuda.is_bf16_supported())
    report("cpu_count", os.cpu_count())
    cpus = os.cpu_count() or 1
    # One GPU for Ray, so every fractional worker shares device 0 whatever the host has.
    start_local(num_cpus=cpus, num_gpus=1, log_to_driver=False)

    section("quarter_gpu_workers", lambda: quarter_gpu_workers(args))
    quickstart = section("quickstart", lambda: quickstart_cuda_vs_cpu(args, out_dir, cpus))
    section("lora", lambda: lora_bf16(args, out_dir))
    section("vectorized", lambda: vectorized_cuda(args, out_dir))
    if quickstart:
        for name, value in quickstart.items():
            report(name, value)


def section(name: str, body):
    """Run one group of checks; a crash fails that group (one line) and the next group still runs."""
    t0 = time.perf_counter()
    try:
        return body()
    except Timeout:
        raise
    except Exception as err:
        check(f"{name}_ran", False, one_line(err))
        return None
    finally:
        report(f"{name}_seconds", time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------
# Checks 1 and 2: four quarter-GPU ClientWorkers
# ----------------------------------------------------------------------------------------------------


def _timed_worker_class():
    """ClientWorker plus a timed train call and memory probes (defined here so Ray ships it by value)."""
    import numpy as np
    import ray
    import torch

    from raysim.engine.worker import ClientWorker

    class TimedWorker(ClientWorker):
        held = None

        def initial_vector(self) -> np.ndarray:
            return self.runtime.flat.vector.detach().cpu().numpy().copy()

        def info(self) -> dict:
            cuda = self.device.type == "cuda"
            return {"pid": os.getpid(), "device": str(self.device), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                    "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                    "fraction": torch.cuda.get_per_process_memory_fraction(self.device) if cuda else None}

        def timed_train(self, *args) -> dict:
            start = time.time()
            result = self.train(*args)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            end = time.time()
            return {"start": start, "end": end, "pid": os.getpid(), "clients": int(len(result.client_ids)),
                    "failed": len(result.failed), "error": result.error,
                    "finite": bool(np.isfinite(result.delta_sum).all()), "weight_sum": float(result.weight_sum)}

        def allocate(self, share: float) -> str:
            """Try to allocate ``share`` of the device's memory and free it again; 'ok' or the error."""
            total = torch.cuda.get_device_properties(self.device).total_memory
            try:
                block = torch.empty(int(share * total), dtype=torch.uint8, device=self.device)
                block.fill_(1)
                torch.cuda.synchronize(self.device)
                del block
                return "ok"
            except torch.cuda.OutOfMemoryError as err:
                return f"{type(err).__module__}.{first_line(err, 160)}"
            finally:
                torch.cuda.empty_cache()

        def hold(self, share: float) -> float:
            total = torch.cuda.get_device_properties(self.device).total_memory
            self.held = torch.ones(int(share * total), dtype=torch.uint8, device=self.device)
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device) / total

        def release(self) -> None:
            self.held = None
            torch.cuda.empty_cache()

    return TimedWorker


def quarter_gpu_workers(args: argparse.Namespace) -> None:
    import numpy as np
    import ray
    import torch

    from raysim.config import load_scenario
    from raysim.data.load import load_data, partition_data
    from raysim.engine.pool import create_workers
    from raysim.engine.worker import ClientBatch, RoundPlan

    scenario = load_scenario(QUICKSTART, ["executor.num_gpus=0.25", "executor.num_cpus=1", "executor.num_workers=4",
                                          "tracking.progress=false"])
    dataset = load_data(scenario)
    part = partition_data(scenario, dataset)
    refs = [ray.put(a) for a in (dataset.x_train, dataset.y_train, part.indices, part.offsets)]
    workers, _ = create_workers(scenario, 4, refs, dataset.feature_shape, dataset.num_classes, _timed_worker_class())
    try:
        infos = ray.get([w.info.remote() for w in workers], timeout=300)
        report("quarter_gpu_devices", ",".join(i["device"] for i in infos))
        report("quarter_gpu_ids", ",".join("/".join(i["gpu_ids"]) for i in infos))
        report("quarter_gpu_memory_fractions", ",".join(f"{i['fraction']}" for i in infos))
        placed = (all(i["device"] == "cuda:0" for i in infos) and len({tuple(i["gpu_ids"]) for i in infos}) == 1
                  and len({i["pid"] for i in infos}) == 4
                  and all(i["fraction"] is not None and abs(i["fraction"] - 0.25) < 1e-9 for i in infos))
        check("check_quarter_gpu_placement", placed,
              "four processes on cuda:0 of one GPU, each allocator capped to 0.25" if placed else str(infos))

        vector = ray.get(workers[0].initial_vector.remote(), timeout=300)
        n = min(args.clients_per_call, scenario.num_clients)
        epochs = np.full(n, scenario.training.epochs, dtype=np.int64)

        def calls(round_index: int) -> list:
            return [w.timed_train.remote(vector, None, round_index, RoundPlan(), k,
                                         ClientBatch(np.sort(np.arange(k * n, (k + 1) * n, dtype=np.int64) % scenario.num_clients),
                                                     epochs))
                    for k, w in enumerate(workers)]

        ray.get(calls(0), timeout=300)  # warm-up: CUDA context, kernels, allocator
        tick = time.time()
        timed = ray.get(calls(1), timeout=300)
        wall = time.time() - tick
        starts, ends = [t["start"] for t in timed], [t["end"] for t in timed]
        busy = sum(e - s for s, e in zip(starts, ends))
        overlap = min(ends) - max(starts)
        report("concurrent_call_seconds", ",".join(f"{e - s:.3f}" for s, e in zip(starts, ends)))
        report("concurrent_overlap_seconds", overlap)
        report("concurrent_wall_seconds", wall)
        report("concurrent_speedup", busy / wall if wall > 0 else 0.0)  # 4.0 would be perfect sharing
        trained = all(t["finite"] and t["failed"] == 0 and t["clients"] == n for t in timed)
        check("check_quarter_gpu_concurrent", overlap > 0 and trained,
              f"all four train calls of {n} clients overlap for {overlap:.3f} s" if overlap > 0 and trained else str(timed))

        free, total = torch.cuda.mem_get_info(0)
        report("gpu_free_gib_before_cap_check", free / 2**30)
        if free < 0.5 * total:
            check("check_memory_cap", False, f"inconclusive: only {free / 2**30:.1f} GiB free; the check needs half the device")
            return
        held = ray.get([w.hold.remote(0.05) for w in workers[1:]], timeout=300)
        report("memory_held_shares", ",".join(f"{h:.3f}" for h in held))
        over = ray.get(workers[0].allocate.remote(0.30), timeout=300)
        report("memory_over_share_result", over)
        after = ray.get(calls(2), timeout=300)  # everyone still trains, holders included
        pids_same = [t["pid"] for t in after] == [i["pid"] for i in infos]
        trained = all(t["finite"] and t["failed"] == 0 for t in after)
        ray.get([w.release.remote() for w in workers[1:]], timeout=300)
        within = ray.get(workers[0].allocate.remote(0.10), timeout=300)
        report("memory_within_share_result", within)
        ok = "OutOfMemoryError" in over and trained and pids_same and within == "ok"
        check("check_memory_cap", ok,
              "30% of the device raised OutOfMemoryError in that worker only; all four workers trained afterwards"
              if ok else f"over={over!r} trained={trained} same_processes={pids_same} within={within!r}")
    finally:
        for w in workers:
            ray.kill(w)


# ----------------------------------------------------------------------------------------------------
# Check 3 and throughput: the quickstart on CUDA and on the CPU
# ----------------------------------------------------------------------------------------------------


def _clients_per_second(result) -> float:
    rounds = result.history[1:] or result.history  # the first round includes worker start-up
    seconds = sum(m["seconds"] for m in rounds)
    return sum(m["clients"] for m in rounds) / seconds if seconds > 0 else 0.0


def quickstart_cuda_vs_cpu(args: argparse.Namespace, out_dir: Path, cpus: int) -> dict:
    import numpy as np

    import raysim

    common = [f"rounds={args.rounds}", f"output.dir={out_dir}", "output.overwrite=true", "tracking.wandb=disabled",
              "tracking.progress=false", "executor.num_cpus=1"]
    gpu = raysim.run(QUICKSTART, overrides=common + ["name=qs_gpu", "executor.num_gpus=0.25", "executor.num_workers=4"])
    cpu = raysim.run(QUICKSTART, overrides=common + ["name=qs_cpu4", "executor.num_gpus=0", "executor.num_workers=4"])
    wide = raysim.run(QUICKSTART, overrides=common + ["name=qs_cpu_all", "executor.num_gpus=0",
                                                      f"executor.num_workers={max(1, min(cpus, MAX_CPU_WORKERS))}"])
    report("quickstart_rounds", args.rounds)
    report("quickstart_gpu_workers", gpu.summary["workers"])
    acc_gpu, acc_cpu = gpu.final_accuracy, cpu.final_accuracy
    scale = 100.0 if max(acc_gpu, acc_cpu) <= 1.0 else 1.0  # accuracy as a fraction: points are 1/100
    report("quickstart_accuracy_gpu", acc_gpu)
    report("quickstart_accuracy_cpu", acc_cpu)
    loss1_gpu, loss1_cpu = gpu.history[0]["loss"], cpu.history[0]["loss"]
    report("quickstart_round1_loss_gpu", loss1_gpu)
    report("quickstart_round1_loss_cpu", loss1_cpu)
    a, b = gpu.global_vector.astype(np.float64), cpu.global_vector.astype(np.float64)
    rel = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    report("quickstart_model_rel_l2", rel)
    curve = max(abs(g["accuracy"] - c["accuracy"]) * scale for g, c in zip(gpu.history, cpu.history)
                if g.get("accuracy") is not None and c.get("accuracy") is not None)
    report("quickstart_max_round_accuracy_gap_points", curve)
    ok = (gpu.summary["workers"] == 4 and abs(loss1_gpu - loss1_cpu) <= ROUND1_LOSS_RTOL * abs(loss1_cpu)
          and abs(acc_gpu - acc_cpu) * scale <= ACCURACY_POINTS and rel <= MODEL_RTOL)
    check("check_quickstart_cuda_matches_cpu", ok,
          f"round-1 loss within {ROUND1_LOSS_RTOL:g} relative, final accuracy within {ACCURACY_POINTS:g} point, "
          f"models within {MODEL_RTOL:g} relative L2")
    report("quickstart_cpu_all_workers", wide.summary["workers"])
    check("check_cpu_worker_count_bit_identical", bool(np.array_equal(cpu.global_vector, wide.global_vector)),
          f"4 and {wide.summary['workers']} CPU workers")
    return {  # printed after the LoRA checks, with them, as the throughput table
        "throughput_clients_per_second_gpu_4x0.25": _clients_per_second(gpu),
        "throughput_clients_per_second_cpu_4": _clients_per_second(cpu),
        f"throughput_clients_per_second_cpu_all_{wide.summary['workers']}": _clients_per_second(wide),
        "quickstart_wall_seconds_gpu": gpu.summary["wall_seconds"],
        "quickstart_wall_seconds_cpu_4": cpu.summary["wall_seconds"],
    }


# ----------------------------------------------------------------------------------------------------
# Check 6: vectorized client training on the GPU
# ----------------------------------------------------------------------------------------------------


def vectorized_cuda(args: argparse.Namespace, out_dir: Path) -> None:
    """The quickstart vectorized on 4 and on 1 quarter-GPU workers against sequential on 4; then client-steps
    per second of one chunk of 1,000 quickstart clients, vectorized against sequential, on cuda:0 (no Ray)."""
    import statistics

    import numpy as np

    import raysim
    from raysim.client.messages import ClientBatch, RoundPlan
    from raysim.config import load_scenario
    from raysim.data.load import load_data, partition_data
    from raysim.models.initial import initial_global
    from raysim.engine.sampling import sample_clients
    from raysim.engine.server import local_epochs
    from raysim.engine.worker import ClientWorker

    common = [f"rounds={args.rounds}", f"output.dir={out_dir}", "output.overwrite=true", "tracking.wandb=disabled",
              "tracking.progress=false", "executor.num_cpus=1", "executor.num_gpus=0.25"]
    sequential = raysim.run(QUICKSTART, overrides=common + ["name=vec_seq4", "executor.num_workers=4"])
    four = raysim.run(QUICKSTART, overrides=common + ["name=vec4", "executor.num_workers=4", "training.vectorize=true"])
    one = raysim.run(QUICKSTART, overrides=common + ["name=vec1", "executor.num_workers=1", "training.vectorize=true"])
    a, b = four.global_vector.astype(np.float64), sequential.global_vector.astype(np.float64)
    rel = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    report("vectorized_quickstart_model_rel_l2", rel)
    check("check_vectorized_cuda_matches_sequential", rel <= 1e-4, "vectorized and sequential within 1e-4 relative L2")
    check("check_vectorized_cuda_worker_count_bit_identical", bool(np.array_equal(four.global_vector, one.global_vector)),
          "vectorized on 4 and on 1 quarter-GPU workers")
    report("vectorized_throughput_clients_per_second_gpu_4x0.25", _clients_per_second(four))

    rates: dict[bool, list[float]] = {False: [], True: []}
    made = {}
    for vectorize in (False, True):
        config = load_scenario(QUICKSTART, ["executor.num_gpus=1", "sampling.clients_per_round=1000",
                                            f"training.vectorize={str(vectorize).lower()}"])
        data = load_data(config)
        part = partition_data(config, data)
        made[vectorize] = ClientWorker.local(config, data.x_train, data.y_train, part.indices, part.offsets,
                                             data.feature_shape, data.num_classes)
    global_vec = initial_global(config, data.feature_shape, data.num_classes)
    for round_index in range(4):
        ids = sample_clients(config.sampling, config.num_clients, config.seed, round_index)
        batch = ClientBatch(client_ids=ids, epochs=local_epochs(config, ids, round_index))
        for vectorize, worker in made.items():
            tick = time.perf_counter()
            if vectorize:
                results = worker.train_pack(global_vec, None, round_index, RoundPlan(), 0, [(0, batch)])
            else:
                results = [worker.train(global_vec, None, round_index, RoundPlan(), 0, batch)]
            steps = sum(int(r.steps.sum()) for r in results)
            if round_index:  # the first pass warms both up
                rates[vectorize].append(steps / (time.perf_counter() - tick))
    seq, vec = statistics.median(rates[False]), statistics.median(rates[True])
    report("vectorized_gpu_1000_sequential_client_steps_per_second", seq)
    report("vectorized_gpu_1000_vectorized_client_steps_per_second", vec)
    report("vectorize_speedup_gpu_1000", vec / seq)


# ----------------------------------------------------------------------------------------------------
# Check 4: bf16 LoRA on a quarter GPU
# ----------------------------------------------------------------------------------------------------


def lora_bf16(args: argparse.Namespace, out_dir: Path) -> None:
    import math

    import ray
    import torch

    import raysim
    from raysim.config import load_scenario
    from raysim.data.load import load_data, partition_data
    from raysim.engine.pool import create_workers

    gpu_overrides = ["executor.num_gpus=0.25", "executor.num_cpus=1", "executor.num_workers=4", "tracking.progress=false"]
    scenario = load_scenario(LORA, gpu_overrides)
    dataset = load_data(scenario)
    part = partition_data(scenario, dataset)
    refs = [ray.put(a) for a in (dataset.x_train, dataset.y_train, part.indices, part.offsets)]
    worker_class = _timed_worker_class()

    def dtypes(self) -> dict:
        frozen, trainable = {}, {}
        for p in self.runtime.model.parameters():
            side = trainable if p.requires_grad else frozen
            side[str(p.dtype)] = side.get(str(p.dtype), 0) + p.numel()
        return {"device": str(self.device), "frozen": frozen, "trainable": trainable,
                "autocast_bf16": bool(getattr(self.runtime.model, "bf16", False))}

    worker_class.dtypes = dtypes
    [worker], _ = create_workers(scenario, 1, refs, dataset.feature_shape, dataset.num_classes, worker_class)
    try:
        info = ray.get(worker.dtypes.remote(), timeout=600)
    finally:
        ray.kill(worker)
    report("lora_device", info["device"])
    report("lora_frozen_dtypes", info["frozen"])
    report("lora_trainable_dtypes", info["trainable"])
    report("lora_autocast_bf16", info["autocast_bf16"])
    bf16_expected = torch.cuda.is_bf16_supported()
    held = (info["device"] == "cuda:0" and set(info["frozen"]) == {str(torch.bfloat16 if bf16_expected else torch.float32)}
            and set(info["trainable"]) == {"torch.float32"} and info["autocast_bf16"] == bf16_expected)
    check("check_lora_bf16_dtypes", held and bf16_expected,
          "frozen base bfloat16, adapters float32, bf16 autocast" if held and bf16_expected
          else ("this GPU has no bf16" if not bf16_expected else str(info)))

    common = [f"rounds={args.lora_rounds}", "evaluation.every=1", f"output.dir={out_dir}", "output.overwrite=true",
              "tracking.wandb=disabled", "tracking.progress=false"]
    gpu = raysim.run(LORA, overrides=common + ["name=lora_gpu"] + gpu_overrides)
    cpu = raysim.run(LORA, overrides=common + ["name=lora_cpu", "executor.num_gpus=0", "executor.num_workers=4",
                                               "executor.num_cpus=1"])
    p_gpu = gpu.history[-1].get("perplexity")
    p_cpu = cpu.history[-1].get("perplexity")
    report("lora_rounds", len(gpu.history))
    report("lora_perplexity_gpu", p_gpu)
    report("lora_perplexity_cpu", p_cpu)
    report("lora_first_perplexity_gpu", gpu.history[0].get("perplexity"))
    for name, result in (("gpu", gpu), ("cpu", cpu)):
        tps = [m["tokens_per_second_per_worker"] for m in result.history if "tokens_per_second_per_worker" in m]
        report(f"throughput_tokens_per_second_per_worker_lora_{name}", tps[-1] if tps else "n/a")
        report(f"throughput_clients_per_second_lora_{name}", _clients_per_second(result))
    report("lora_worker_rss_mb_gpu", gpu.history[-1].get("worker_rss_mb"))
    ok = (len(gpu.history) == args.lora_rounds and p_gpu is not None and p_cpu is not None and math.isfinite(p_gpu)
          and abs(p_gpu - p_cpu) <= LORA_PERPLEXITY_RTOL * p_cpu)
    check("check_lora_bf16_runs", ok, f"{args.lora_rounds} rounds on 0.25-GPU workers; perplexity within "
          f"{LORA_PERPLEXITY_RTOL:.0%} of the float32 CPU run")


if __name__ == "__main__":
    sys.exit(main())
