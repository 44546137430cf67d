"""Time one client's local training with DP-SGD (raysim.privacy.dp.local_dpsgd) against the engine's plain loop.

Both sides are what a worker runs per client (``raysim.engine.worker.ClientWorker.train``): the same
data (500 examples, 64 features, 10 classes), the same 9,610-parameter MLP held in a ``FlatParams``
buffer and reloaded from the same global vector before every client, batch 32, one epoch of
ceil(500/32) = 16 steps, SGD at the same learning rate, and the same torch thread count. The plain side
is ``raysim.client.train.train_client`` over a shuffled partition into batches; the DP side is a whole
``train_dp_sgd`` call followed by ``FlatParams.rebind_grads``: Opacus wrapping, Poisson batches of
expected size 32 (16 of them), per-sample gradients, clipping and noise, hook removal, and the
client's ε from its persisting accountant.

Then the vectorized pair (``training.vectorize``): ``--clients`` such clients (each its own 500
examples) trained as one stack, plain (``raysim.client.vectorized.StackedTrainer``) and with DP-SGD
(``raysim.privacy.dp.vectorized_dpsgd``: per-sample gradients, clipping and noise for the whole stack,
the same Poisson batches and noise as the Opacus side). The variants run interleaved ``--repeats`` times
after a warm-up and their medians are compared:

    opacus_overhead_ratio = Opacus DP-SGD per client / plain sequential per client        (issue 6: <= 3)
    dpsgd_vs_sequential_ratio = vectorized DP-SGD per client / plain sequential per client
    dpsgd_overhead_ratio = vectorized DP-SGD / vectorized plain training, the same stack   (issue 17: <= 2)

Usage: python scripts/bench_dpsgd.py [--repeats 30] [--threads 1] [--clients 50]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any, Callable

import numpy as np
import torch

from raysim.client.train import make_optimizer, train_client
from raysim.client.vectorized import StackedClient, StackedTrainer
from raysim.config import TrainingConfig
from raysim.models.flat import FlatParams
from raysim.privacy.dp.local_dpsgd import train_dp_sgd
from raysim.privacy.dp.vectorized_dpsgd import PrivateClient, PrivateStackedTrainer

EXAMPLES, FEATURES, CLASSES, HIDDEN, BATCH, LR = 500, 64, 10, 128, 32, 0.05


def make_model() -> tuple[torch.nn.Module, FlatParams]:
    """The MLP in the flat buffer a worker keeps resident (parameters and gradients as two flat vectors)."""
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, CLASSES))
    return model, FlatParams(model)


def median_seconds(runners: dict[str, Callable[[int], None]], repeats: int, warmup: int = 3,
                   clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds (wall, or ``clock``'s) of each runner, called interleaved with the same seeds after
    ``warmup`` calls each."""
    for seed in range(warmup):
        for runner in runners.values():
            runner(seed)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for seed in range(warmup, warmup + repeats):
        for name, runner in runners.items():
            start = clock()
            runner(seed)
            times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clients", type=int, default=50, help="clients in the vectorized stack")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((EXAMPLES, FEATURES)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, CLASSES, EXAMPLES))
    torch.manual_seed(0)
    plain_model, plain_flat = make_model()
    dp_model, dp_flat = make_model()
    global_vec = plain_flat.vector.detach().clone()
    optimizer = make_optimizer(TrainingConfig(lr=LR, batch_size=BATCH), plain_flat.params)
    state: dict[str, Any] = {"accountant": None, "epsilon": 0.0}

    def run_plain(seed: int) -> None:
        plain_flat.load(global_vec)
        train_client(plain_model, plain_flat, optimizer, x, y, epochs=1, batch_size=BATCH, rng=np.random.default_rng(seed))

    def run_dp(seed: int) -> None:
        dp_flat.load(global_vec)
        result = train_dp_sgd(
            dp_model, x, y, epochs=1, batch_size=BATCH, lr=LR, noise_multiplier=1.0, max_grad_norm=1.0,
            accountant_state=state["accountant"], delta=1e-5, seed=seed,
        )
        dp_flat.rebind_grads()
        state["accountant"], state["epsilon"] = result.accountant_state, result.epsilon

    cpu = torch.device("cpu")
    xs = [torch.from_numpy(rng.standard_normal((EXAMPLES, FEATURES)).astype(np.float32)) for _ in range(args.clients)]
    ys = [torch.from_numpy(rng.integers(0, CLASSES, EXAMPLES)) for _ in range(args.clients)]
    stacked = StackedTrainer(plain_model, (FEATURES,), TrainingConfig(lr=LR, batch_size=BATCH), cpu, 2**31)
    private = PrivateStackedTrainer(stacked.stacked, BATCH, LR, 1.0, 1.0, "rdp", 1e-5, cpu)

    def run_stacked(seed: int) -> None:
        stacked.train([StackedClient(x=a, y=b, epochs=1, rng=np.random.default_rng([seed, k]), start=global_vec)
                       for k, (a, b) in enumerate(zip(xs, ys))], lambda order, a: None)

    def run_private(seed: int) -> None:
        private.train([PrivateClient(x=a, y=b, epochs=1, seed=seed * 1000 + k, start=global_vec, accountant_state=None)
                       for k, (a, b) in enumerate(zip(xs, ys))])

    medians = median_seconds({"plain": run_plain, "dp": run_dp, "stacked": run_stacked, "private": run_private},
                             args.repeats)
    plain, dp = medians["plain"], medians["dp"]
    per_client = {name: medians[name] / args.clients for name in ("stacked", "private")}
    print(f"model_params: {plain_flat.size}")
    print(f"steps_per_epoch: {math.ceil(EXAMPLES / BATCH)}  batch: {BATCH}  threads: {args.threads}  repeats: {args.repeats}")
    print(f"plain_ms: {plain * 1e3:.2f}  (sequential, one client)")
    print(f"dpsgd_ms: {dp * 1e3:.2f}  (Opacus, one client; epsilon after {args.repeats + 3} rounds: {state['epsilon']:.3f})")
    print(f"vectorized_plain_ms_per_client: {per_client['stacked'] * 1e3:.2f}  (a stack of {args.clients})")
    print(f"vectorized_dpsgd_ms_per_client: {per_client['private'] * 1e3:.2f}")
    print(f"opacus_overhead_ratio: {dp / plain:.2f}")
    print(f"dpsgd_vs_sequential_ratio: {per_client['private'] / plain:.2f}")
    print(f"dpsgd_overhead_ratio: {medians['private'] / medians['stacked']:.2f}")


if __name__ == "__main__":
    main()
