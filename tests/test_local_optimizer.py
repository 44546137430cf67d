"""``LocalOptimizer`` against ``torch.optim``: the same parameters bit for bit, client after client.

Each case trains the zoo's MLP with ``train_client`` twice from the same start, once with the optimizer
``make_optimizer`` builds and once with the ``torch.optim`` optimizer it replaces, over several clients
in a row (so the state is reset between clients), and compares the flat parameters exactly.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from raysim.client.optimizer import LocalOptimizer
from raysim.client.rng import client_rng
from raysim.client.train import make_optimizer, train_client
from raysim.config import ModelConfig, TrainingConfig
from raysim.models.flat import FlatParams
from raysim.models.zoo import build_model

CONFIGS = {
    "sgd": TrainingConfig(lr=0.1, batch_size=8),
    "sgd-momentum-decay": TrainingConfig(lr=0.05, batch_size=8, momentum=0.9, weight_decay=1e-3),
    "adam": TrainingConfig(lr=0.01, batch_size=8, optimizer="adam"),
    "adam-decay": TrainingConfig(lr=0.01, batch_size=8, optimizer="adam", weight_decay=1e-2),
}


def _torch_optimizer(config: TrainingConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


class _TorchAsLocal:
    """``torch.optim`` behind ``LocalOptimizer``'s two methods, for ``train_client``."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def reset(self) -> None:
        self.optimizer.state.clear()

    def step(self) -> None:
        self.optimizer.step()


def _train(config: TrainingConfig, use_torch: bool) -> torch.Tensor:
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="mlp", hidden=[16, 8]), (12,), 4)
    flat = FlatParams(model)
    optimizer = _TorchAsLocal(_torch_optimizer(config, flat.params)) if use_torch else make_optimizer(config, flat.params)
    g = torch.Generator().manual_seed(1)
    start, rows = flat.vector.clone(), []
    for cid, n in enumerate([30, 7, 21]):
        x, y = torch.randn(n, 12, generator=g), torch.randint(0, 4, (n,), generator=g)
        flat.load(start)
        train_client(model, flat, optimizer, x, y, epochs=3, batch_size=config.batch_size, rng=client_rng(3, 0, cid))
        rows.append(flat.vector.clone())
    return torch.stack(rows)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bit_identical_to_torch_optim(name: str) -> None:
    config = CONFIGS[name]
    ours, theirs = _train(config, use_torch=False), _train(config, use_torch=True)
    assert not torch.equal(ours[0], ours[1])  # the clients really trained, differently
    assert torch.equal(ours, theirs)


def test_reset_forgets_the_state() -> None:
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = LocalOptimizer([param], kind="adam", lr=0.1)
    param.grad = torch.ones(3)
    optimizer.step()
    first = param.detach().clone()
    optimizer.step()
    param.data.zero_()
    optimizer.reset()
    optimizer.step()
    assert torch.equal(param.detach(), first)  # after reset, the step is a first step again


def test_no_dynamo_import() -> None:
    """A client's training never imports ``torch._dynamo`` (the start-up cost this optimizer removes)."""
    code = (
        "import sys, torch\n"
        "from raysim.engine.worker import warm_up\n"
        "from raysim.client.train import make_optimizer\n"
        "from raysim.config import TrainingConfig\n"
        "warm_up()\n"
        "p = torch.nn.Parameter(torch.ones(2)); p.grad = torch.ones(2)\n"
        "make_optimizer(TrainingConfig(optimizer='adam'), [p]).step()\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.split()[-1] == "False"
