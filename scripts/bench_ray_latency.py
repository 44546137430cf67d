"""What one Ray actor call per worker per round costs on this host, against two processes joined by pipes.

``bench_overhead.py`` compares raysim's rounds with one process training the same clients in a loop; this
script isolates the part of the difference that belongs to Ray itself. Each round sends the same
``--dim`` float32 vector (the global model of bench_overhead's MLP by default) to ``--workers`` processes,
each does the same fixed work (``--iterations`` steps of ``tanh(x @ a * 0.05)`` on a 200 × 200 matrix, one
torch thread) and returns the vector. The rounds run three ways, interleaved ``--blocks`` times after a
warm-up, medians compared:

    pipe_round_ms      worker processes joined by ``multiprocessing`` pipes (no Ray): the baseline
    ray_round_ms       Ray actors, one ``.remote`` call each and one ``ray.get`` (what the engine does)
    compiled_round_ms  the same actors in a Ray compiled graph (``--compiled``; Ray's low-latency path)

    ray_call_ratio = ray_round_ms / pipe_round_ms

Usage: python scripts/bench_ray_latency.py [--workers 2] [--rounds 40] [--blocks 3] [--compiled]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
from multiprocessing.connection import Connection
from typing import Callable

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import ray  # noqa: E402

from raysim.engine.cluster import start_local  # noqa: E402

DIM = 32 * 240 + 240 + 240 * 10 + 10  # bench_overhead.py's MLP


class Work:
    """The fixed work of a round: ``iterations`` steps of a 200 × 200 matrix product and tanh (O(1) values, no
    denormals), on one torch thread."""

    def __init__(self, iterations: int) -> None:
        import torch

        torch.set_num_threads(1)
        self.torch, self.iterations = torch, iterations
        self.a = torch.randn(200, 200, generator=torch.Generator().manual_seed(0))

    def __call__(self, vec: np.ndarray) -> np.ndarray:
        x = self.a
        for _ in range(self.iterations):
            x = self.torch.tanh(x @ self.a * 0.05)
        return vec


@ray.remote(num_cpus=1)
class RayWorker:
    def __init__(self, iterations: int) -> None:
        self.work = Work(iterations)

    def train(self, vec: np.ndarray) -> np.ndarray:
        return self.work(vec)


def _pipe_worker(iterations: int, conn: Connection) -> None:
    work = Work(iterations)
    while (vec := conn.recv()) is not None:
        conn.send(work(vec))


def median_ms(round_: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        round_()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=40, help="rounds per block and way")
    parser.add_argument("--blocks", type=int, default=3, help="interleaved blocks of rounds")
    parser.add_argument("--iterations", type=int, default=160, help="work per worker per round")
    parser.add_argument("--dim", type=int, default=DIM, help="float32 numbers sent and returned per call")
    parser.add_argument("--compiled", action="store_true", help="also time a Ray compiled graph")
    args = parser.parse_args()
    vec = np.zeros(args.dim, dtype=np.float32)

    work = Work(args.iterations)
    work(vec)
    work_ms = median_ms(lambda: work(vec), 10)

    context = multiprocessing.get_context("spawn")
    pipes, processes = [], []
    for _ in range(args.workers):
        ours, theirs = context.Pipe()
        process = context.Process(target=_pipe_worker, args=(args.iterations, theirs), daemon=True)
        process.start()
        pipes.append(ours)
        processes.append(process)

    def pipe_round() -> None:
        for conn in pipes:
            conn.send(vec)
        for conn in pipes:
            conn.recv()

    start_local(num_cpus=args.workers, log_to_driver=False)
    actors = [RayWorker.remote(args.iterations) for _ in range(args.workers)]

    def ray_round() -> None:
        ray.get([actor.train.remote(vec) for actor in actors])

    ways: dict[str, Callable[[], object]] = {"pipe": pipe_round, "ray": ray_round}
    compiled = None
    if args.compiled:
        from ray.dag import InputNode, MultiOutputNode

        with InputNode() as given:
            compiled = MultiOutputNode([actor.train.bind(given) for actor in actors]).experimental_compile()
        ways["compiled"] = lambda: ray.get(compiled.execute(vec))
    for round_ in ways.values():  # warm-up: imports, first calls, the compiled graph's channels
        median_ms(round_, 5)
    results: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.blocks):
        for name, round_ in ways.items():
            results[name].append(median_ms(round_, args.rounds))
    if compiled is not None:
        compiled.teardown()
    for conn in pipes:
        conn.send(None)
    for process in processes:
        process.join()
    ray.shutdown()

    medians = {name: statistics.median(values) for name, values in results.items()}
    print(f"workers: {args.workers}  dim: {args.dim}  one worker's work alone: {work_ms:.2f} ms")
    for name, values in results.items():
        print(f"{name}_round_ms: {medians[name]:.2f}  (blocks: {', '.join(f'{v:.2f}' for v in values)})")
    print(f"ray_call_ratio: {medians['ray'] / medians['pipe']:.3f}")


if __name__ == "__main__":
    main()
