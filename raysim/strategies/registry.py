"""Builds the strategy a scenario names."""

from __future__ import annotations

from raysim.client.state import make_state_store
from raysim.config import StrategyConfig
from raysim.strategies.base import Strategy
from raysim.strategies.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from raysim.strategies.scaffold import Scaffold


def make_strategy(config: StrategyConfig, *, num_clients: int = 1, dim: int = 0, state_width: int | None = None,
                  state_dir: str | None = None) -> Strategy:
    """The server update rule for ``strategy.name`` (FedProx's server is FedAvg; its change is client-side).

    ``state_width`` is the width of the per-client state rows (``dim`` unless they are kept sealed).
    """
    if config.name in ("fedavg", "fedprox"):
        return Strategy(config.server_lr)
    if config.name == "scaffold":
        store = make_state_store(config.state_store, state_width or dim, state_dir if config.state_store == "disk" else None)
        return Scaffold(config.server_lr, num_clients, store, dim)
    if config.name == "fedavgm":
        return FedAvgM(config.server_lr, config.momentum)
    adaptive = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}[config.name]
    return adaptive(config.server_lr, config.beta1, config.beta2, config.tau)
