"""Builds the strategy a scenario names: its server half and its client half."""

from __future__ import annotations

from raysim.config import StrategyConfig
from raysim.strategies.base import ClientHalf, Strategy
from raysim.strategies.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from raysim.strategies.fedprox import FedProx, ProximalClient
from raysim.strategies.scaffold import RowStore, Scaffold, ScaffoldClient


def make_strategy(config: StrategyConfig, *, num_clients: int = 1, dim: int = 0, store: RowStore | None = None) -> Strategy:
    """The server update rule for ``strategy.name``; SCAFFOLD keeps its clients' c_i in ``store``."""
    if config.name == "fedavg":
        return Strategy(config.server_lr)
    if config.name == "fedprox":
        return FedProx(config.server_lr)
    if config.name == "scaffold":
        if store is None:
            raise ValueError("make_strategy: scaffold needs a per-client state store")
        return Scaffold(config.server_lr, num_clients, store, dim)
    if config.name == "fedavgm":
        return FedAvgM(config.server_lr, config.momentum)
    adaptive = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}[config.name]
    return adaptive(config.server_lr, config.beta1, config.beta2, config.tau)


def make_client_half(config: StrategyConfig, lr: float) -> ClientHalf:
    """The client half of ``strategy.name``; ``lr`` is the local learning rate η_l."""
    if config.name == "fedprox":
        return ProximalClient(config.mu)
    if config.name == "scaffold":
        return ScaffoldClient(lr)
    return ClientHalf()
