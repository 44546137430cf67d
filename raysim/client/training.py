"""The first stage: a client's local training from the global model, plain SGD or DP-SGD behind one entry point.

``ClientRuntime`` is what a worker keeps resident (the model, its flat view, the optimizer, the task and
the device). ``LocalTraining`` loads the global vector into it, runs the strategy's client half
(FedProx's proximal term, SCAFFOLD's correction and Δc_i; ``raysim.strategies``) around
``train_client``, or local DP-SGD through Opacus (Abadi et al. 2016; ``raysim.privacy.dp.local_dpsgd``),
and leaves the client's delta, weight, loss and steps on the update. A client whose training raises
is a dropout (counted in ``failed``), not the end of the run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from raysim.client.faults import InjectedClientError
from raysim.client.pipeline import Chunk, ClientUpdate, Stage
from raysim.client.train import LocalResult, client_rng, make_optimizer, seed_torch, train_client
from raysim.config import Scenario
from raysim.errors import ScenarioError, first_line
from raysim.models.flat import FlatParams
from raysim.models.task import Task
from raysim.strategies.base import ClientHalf


@dataclass
class ClientRuntime:
    """The resident model a worker trains every client on."""

    model: torch.nn.Module
    flat: FlatParams
    optimizer: torch.optim.Optimizer
    task: Task
    device: torch.device

    @classmethod
    def of(cls, scenario: Scenario, model: torch.nn.Module, task: Task, device: torch.device) -> ClientRuntime:
        flat = FlatParams(model)
        return cls(model, flat, make_optimizer(scenario.training, flat.params), task, device)


class LocalTraining(Stage):
    def __init__(self, scenario: Scenario, runtime: ClientRuntime | None, strategy: ClientHalf) -> None:
        self.scenario, self.runtime, self.strategy = scenario, runtime, strategy

    def client(self, update: ClientUpdate, chunk: Chunk) -> bool:
        runtime, k, cid = self.runtime, update.position, update.client_id
        x, y = torch.from_numpy(update.x).to(runtime.device), torch.from_numpy(update.y).to(runtime.device)
        runtime.flat.load(chunk.global_t)
        own = None if chunk.states is None else torch.from_numpy(chunk.states[k]).to(runtime.device)
        seed, epochs = self.scenario.seed, int(chunk.batch.epochs[k])
        rng = client_rng(seed, chunk.round_index, cid)
        seed_torch(int(client_rng(seed, chunk.round_index, cid, stream=11).integers(2**63)), runtime.device)  # dropout
        chunk.tokens += runtime.task.tokens(x) * epochs
        try:
            if update.fault == "error":
                raise InjectedClientError(f"client {cid} raised (faults.client_error_fraction)")
            result = self._train(x, y, epochs, rng, chunk, k, own)
        except ScenarioError:
            raise
        except Exception as err:  # a client that crashes is a dropout, not the end of the run
            chunk.failed.append(cid)
            chunk.error = chunk.error or first_line(err)
            return False
        update.delta = runtime.flat.vector - chunk.global_t
        update.loss = result.mean_loss if np.isfinite(result.mean_loss) else 0.0
        update.steps = result.steps
        weighting = self.scenario.strategy.client_weighting
        size = runtime.task.tokens(x) / x.shape[1] if weighting == "tokens" else x.shape[0]
        update.weight = chunk.plan.weight(size, weighting)  # tokens in full sequences: <= samples
        if own is not None:
            update.state_delta = self.strategy.state_delta(own, chunk.control, chunk.global_t, runtime.flat.vector,
                                                           result.steps).cpu().numpy()
        return True

    def _train(self, x: torch.Tensor, y: torch.Tensor, epochs: int, rng: np.random.Generator, chunk: Chunk,
               k: int, own: torch.Tensor | None) -> LocalResult:
        runtime, training = self.runtime, self.scenario.training
        if chunk.batch.dp_states is None:
            return train_client(runtime.model, runtime.flat, runtime.optimizer, x, y, epochs=epochs,
                                batch_size=training.batch_size, rng=rng, task=runtime.task,
                                hook=self.strategy.gradient_hook(chunk.global_t, chunk.control, own))
        result = self._train_dp_sgd(x, y, epochs, chunk.batch.dp_states[k], rng)
        chunk.dp_states[k], chunk.epsilons[k] = result.accountant_state, result.epsilon
        return result

    def _train_dp_sgd(self, x: torch.Tensor, y: torch.Tensor, epochs: int, state: dict | None,
                      rng: np.random.Generator):
        """Local DP-SGD through Opacus; the client's accountant continues from ``state``."""
        from raysim.privacy.dp.local_dpsgd import train_dp_sgd  # Opacus loads only in runs that use it

        privacy, training, runtime = self.scenario.privacy, self.scenario.training, self.runtime
        result = train_dp_sgd(
            runtime.model, x, y, epochs=epochs, batch_size=training.batch_size, lr=training.lr,
            noise_multiplier=privacy.noise_multiplier, max_grad_norm=privacy.clip_norm, accountant_state=state,
            delta=privacy.delta, seed=int(rng.integers(2**63)), device=str(runtime.device),
            accountant=privacy.accountant, loss_fn=runtime.task.loss,
        )
        runtime.flat.rebind_grads()  # Opacus leaves .grad unset; point it back into the flat buffer
        return result
