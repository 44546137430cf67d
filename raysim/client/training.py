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
from typing import Any, Callable

import numpy as np
import torch

from raysim.client.faults import InjectedClientError
from raysim.client.optimizer import LocalOptimizer
from raysim.client.pipeline import Chunk, ClientUpdate, Stage
from raysim.client.rng import client_rng
from raysim.client.train import LocalResult, make_optimizer, seed_torch, train_client
from raysim.client.vectorized import StackedClient, StackedTrainer
from raysim.config import ExecutorConfig, Scenario
from raysim.errors import ScenarioError, first_line
from raysim.models.flat import FlatParams
from raysim.models.task import Task
from raysim.strategies.base import ClientHalf


@dataclass
class ClientRuntime:
    """The resident model a worker trains every client on."""

    model: torch.nn.Module
    flat: FlatParams
    optimizer: LocalOptimizer
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
        runtime.flat.load(chunk.global_t if update.start is None else update.start)
        own = self._own_state(chunk, k)
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
            return self._failed(chunk, cid, err)
        self._finish(update, chunk, runtime.flat.vector, result, own, x)
        return True

    def _own_state(self, chunk: Chunk, k: int) -> torch.Tensor | None:
        """The client's own strategy state (SCAFFOLD's c_i) on the device, or None."""
        return None if chunk.states is None else torch.from_numpy(chunk.states[k]).to(self.runtime.device)

    @staticmethod
    def _failed(chunk: Chunk, client_id: int, err: Exception) -> bool:
        chunk.failed.append(client_id)
        chunk.error = chunk.error or first_line(err)
        return False

    def _finish(self, update: ClientUpdate, chunk: Chunk, local: torch.Tensor, result: LocalResult,
                own: torch.Tensor | None, x: torch.Tensor) -> None:
        """Leave the client's delta, loss, steps, weight and state change on ``update``."""
        runtime = self.runtime
        update.delta = local - chunk.global_t
        update.loss = result.mean_loss if np.isfinite(result.mean_loss) else 0.0
        update.steps = result.steps
        weighting = self.scenario.strategy.client_weighting
        size = runtime.task.tokens(x) / x.shape[1] if weighting == "tokens" else x.shape[0]
        update.weight = chunk.plan.weight(size, weighting)  # tokens in full sequences: <= samples
        if own is not None:
            update.state_delta = self.strategy.state_delta(own, chunk.control, chunk.global_t, local,
                                                           result.steps).cpu().numpy()

    def _train(self, x: torch.Tensor, y: torch.Tensor, epochs: int, rng: np.random.Generator, chunk: Chunk,
               k: int, own: torch.Tensor | None) -> LocalResult:
        runtime, training = self.runtime, self.scenario.training
        if chunk.batch.dp_states is None:
            return train_client(runtime.model, runtime.flat, runtime.optimizer, x, y, epochs=epochs,
                                batch_size=training.batch_size, rng=rng, task=runtime.task,
                                hook=self.strategy.gradient_hook(chunk.global_t, chunk.control, own))
        result = self._train_dp_sgd(x, y, epochs, chunk.batch.dp_states[k], rng,
                                    self.strategy.gradient_hook(chunk.global_t, chunk.control, own))
        chunk.dp_states[k], chunk.epsilons[k] = result.accountant_state, result.epsilon
        return result

    def _train_dp_sgd(self, x: torch.Tensor, y: torch.Tensor, epochs: int, state: dict | None,
                      rng: np.random.Generator, hook: Callable[[torch.Tensor, torch.Tensor], Any] | None = None):
        """Local DP-SGD through Opacus; the client's accountant continues from ``state``. The strategy's
        ``hook`` (FedProx, SCAFFOLD) joins each private step as its data-free term."""
        from raysim.privacy.dp.local_dpsgd import train_dp_sgd  # Opacus loads only in runs that use it

        privacy, training, runtime = self.scenario.privacy, self.scenario.training, self.runtime
        result = train_dp_sgd(
            runtime.model, x, y, epochs=epochs, batch_size=training.batch_size, lr=training.lr,
            noise_multiplier=privacy.noise_multiplier, max_grad_norm=privacy.clip_norm, accountant_state=state,
            delta=privacy.delta, seed=int(rng.integers(2**63)), device=str(runtime.device),
            accountant=privacy.accountant, loss_fn=runtime.task.loss,
            step_term=None if hook is None else self._step_term(hook, training.lr),
        )
        runtime.flat.rebind_grads()  # Opacus leaves .grad unset; point it back into the flat buffer
        return result

    def _step_term(self, hook: Callable[[torch.Tensor, torch.Tensor], Any], lr: float) -> Callable[[], Callable[[], None]]:
        """``hook``'s term h(w) at the weights before a step, applied after it as w −= lr·h(w)."""
        weights = self.runtime.flat.vector

        def before() -> Callable[[], None]:
            term = torch.zeros_like(weights)
            hook(term, weights)
            return lambda: weights.sub_(term, alpha=lr)
        return before


class VectorizedTraining(LocalTraining):
    """The training stage under ``training.vectorize``: a call's clients trained together
    (``raysim.client.vectorized``), ``trainer.max_clients`` at a time, then finished one by one as
    ``LocalTraining`` finishes them. It trains through ``clients``, which ``Pipeline.run_together`` calls."""

    def __init__(self, scenario: Scenario, runtime: ClientRuntime, strategy: ClientHalf,
                 sample_shape: tuple[int, ...]) -> None:
        super().__init__(scenario, runtime, strategy)
        privacy, training = scenario.privacy, scenario.training
        local_dp = privacy is not None and privacy.mechanism == "local"
        extra = 2 if scenario.strategy.name == "scaffold" else 0
        if local_dp:  # per-sample gradients and their clipped copies, of Poisson batches padded to the private width
            from raysim.privacy.dp.vectorized_dpsgd import private_width  # Opacus's accountant: DP runs only

            extra += 4 * private_width(training.batch_size)
        self.trainer = StackedTrainer(runtime.model, sample_shape, training, runtime.device,
                                      memory_budget(scenario.executor, runtime.device), extra_rows=extra)
        self.private = None
        if local_dp:
            from raysim.privacy.dp.vectorized_dpsgd import PrivateStackedTrainer

            self.private = PrivateStackedTrainer(
                self.trainer.stacked, training.batch_size, training.lr, privacy.noise_multiplier, privacy.clip_norm,
                privacy.accountant, privacy.delta, runtime.device)

    def clients(self, items: list[tuple[ClientUpdate, Chunk]]) -> list[bool]:
        """Train every (update, chunk) of ``items``; True where the update goes on to the next stage."""
        runtime, seed = self.runtime, self.scenario.seed
        kept, ok = [], [False] * len(items)
        for i, (update, chunk) in enumerate(items):
            epochs = int(chunk.batch.epochs[update.position])
            chunk.tokens += runtime.task.tokens(torch.from_numpy(update.x)) * epochs
            if update.fault == "error":
                self._failed(chunk, update.client_id, InjectedClientError(
                    f"client {update.client_id} raised (faults.client_error_fraction)"))
            else:
                kept.append(i)
        size = self.trainer.max_clients
        for group in (kept[start : start + size] for start in range(0, len(kept), size)):
            stack = []
            for i in group:
                update, chunk = items[i]
                stack.append(StackedClient(
                    x=torch.from_numpy(update.x).to(runtime.device), y=torch.from_numpy(update.y).to(runtime.device),
                    epochs=int(chunk.batch.epochs[update.position]), start=chunk.global_t,
                    rng=client_rng(seed, chunk.round_index, update.client_id)))
            owns = [self._own_state(items[i][1], items[i][0].position) for i in group]
            try:
                result = self._train_stack(group, items, stack, owns)
            except ScenarioError:
                raise
            except Exception as err:  # the stack crashed: its clients are dropouts, as one client's crash is
                for i in group:
                    self._failed(items[i][1], items[i][0].client_id, err)
                continue
            for j, i in enumerate(group):
                update, chunk = items[i]
                local = LocalResult(steps=int(result.steps[j]), mean_loss=float(result.mean_loss[j]))
                self._finish(update, chunk, result.local[j], local, owns[j], stack[j].x)
                ok[i] = True
        return ok

    def _train_stack(self, group: list[int], items: list[tuple[ClientUpdate, Chunk]], stack: list[StackedClient],
                     owns: list[torch.Tensor | None]):
        """The stack's training, plain or DP-SGD (whose accountants' states and ε go back on the chunks)."""
        if self.private is None:
            return self.trainer.train(stack, self._hooks([items[i][1] for i in group], stack, owns))
        from raysim.privacy.dp.vectorized_dpsgd import PrivateClient

        clients = [PrivateClient(x=c.x, y=c.y, epochs=c.epochs, seed=int(c.rng.integers(2**63)), start=c.start,
                                 accountant_state=items[i][1].batch.dp_states[items[i][0].position])
                   for i, c in zip(group, stack)]
        result = self.private.train(clients)
        for j, i in enumerate(group):
            update, chunk = items[i]
            chunk.dp_states[update.position] = result.accountant_states[j]
            chunk.epsilons[update.position] = result.epsilons[j]
        return result

    def _hooks(self, chunks: list[Chunk], stack: list[StackedClient], owns: list[torch.Tensor | None]):
        """``hook_for(order, a)``: the strategy's gradient hook over the top ``a`` rows of the stack."""
        def hook_for(order: np.ndarray, a: int):
            if not self.strategy.hooks_gradients:
                return None
            top = order[:a].tolist()
            anchor = torch.stack([stack[j].start for j in top])
            own = None if owns[0] is None else torch.stack([owns[j] for j in top])
            control = None if chunks[0].control is None else torch.stack([chunks[j].control for j in top])
            return self.strategy.gradient_hook(anchor, control, own)
        return hook_for


def memory_budget(executor: ExecutorConfig, device: torch.device) -> float:
    """Bytes a worker's stacked clients may take: ``executor.vectorize_memory_mb``, and on a GPU at most
    half of the worker's share of the device (``executor.num_gpus``)."""
    budget = executor.vectorize_memory_mb * 2**20
    if device.type == "cuda":
        share = min(1.0, executor.num_gpus or 1.0) * torch.cuda.get_device_properties(device).total_memory
        budget = min(budget, share / 2)
    return budget
