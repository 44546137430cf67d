"""Each algorithm whole: its server update rule and its client half."""

from raysim.strategies.base import Aggregate, ClientHalf, ControlUpdate, Strategy, weighted_mean
from raysim.strategies.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from raysim.strategies.fedprox import FedProx
from raysim.strategies.registry import make_client_half, make_strategy
from raysim.strategies.scaffold import Scaffold

__all__ = ["Aggregate", "ClientHalf", "ControlUpdate", "FedAdagrad", "FedAdam", "FedAvgM", "FedProx", "FedYogi",
           "Scaffold", "Strategy", "make_client_half", "make_strategy", "weighted_mean"]
