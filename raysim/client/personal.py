"""Personalized FL: per-client models that live on the client (the scenario's ``personalization:`` block).

One stage, right after local training, and one evaluation, per method:

* ``finetune`` (FedAvg + FT): training is FedAvg; a client's personalized model is the global model after
  ``finetune_epochs`` of local SGD on its own training samples, built when it is evaluated. No state.
* ``fedper`` (Arivazhagan et al., 2019): the ``personal_layers`` (default: the head, the last layer with
  parameters) never leave the client. It trains from the global body and its own head; its update's
  personal coordinates are zeroed before any later stage, so no aggregate (plain, robust, DP-noised or
  secure) holds them, and the server half zeroes them again in the released sum (secure aggregation's
  rounding and DP's noise land there too), so the global vector's stay bit-identical to the start's.
* ``ditto`` (Li, Hu, Beirami, Smith, ICML 2021): besides its usual global update, each client keeps v_k
  and takes ``personal_epochs`` of SGD on F_k(v) + λ/2·‖v − w‖², w the global model it received. The
  quadratic's step is taken in closed form after each gradient step, v ← (v + ηλ·w)/(1 + ηλ) (its
  proximal operator), so every λ ≥ 0 is stable and λ → ∞ gives v = w exactly.
* ``apfl`` (Deng, Kamani, Mahdavi, 2020): v_k is mixed with the model, v̄ = α·v + (1 − α)·w. The personal
  pass takes SGD steps on v with the mixed model's gradient, ∂F(v̄)/∂v = α·∇F(v̄), w being the client's
  model after this round's local training; the personalized model is α·v + (1 − α)·w with the current
  global w. APFL rather than pFedMe: APFL's personal step is one more SGD pass beside the global one, as
  Ditto's is, while pFedMe replaces the local solver itself (an inner Moreau-envelope problem at every
  step), which would fork the training stage.

A client's state is one row, [1, its personal values] (the head's k coordinates for fedper, all d for
ditto and apfl); a store fills rows lazily with zeros, and a leading 0 means the client has not trained
yet: its personal model starts from the global model it receives (for fedper, the initial head). The
personal pass uses plain SGD at ``training.lr`` whatever ``training.optimizer`` says. The rows travel with
the client's task (in async modes, read when the task is launched), go back to the server's client state
store when its update is used (sealed under secure aggregation), are checkpointed with it, and never enter
an aggregate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from raysim.client.pipeline import Chunk, ClientUpdate, Released, Stage
from raysim.client.rng import client_rng
from raysim.config import PersonalizationConfig, Scenario
from raysim.errors import ScenarioError

if TYPE_CHECKING:  # the client halves run in workers, which import torch; the server's FedPer half needs none
    import torch
    from torch import nn

PERSONAL_STREAM, FINETUNE_STREAM = 13, 14
PRIVACY_NOTE = {
    "finetune": "fine-tuning happens on the client after the run's rounds and releases nothing, so it costs no "
                "privacy budget",
    "fedper": "the personal layers never leave their client and enter no aggregate, so the budget above covers "
              "every parameter the server sees and the personal layers cost none",
    "ditto": "each client's personal model never leaves it and enters no aggregate, so it costs no privacy budget; "
             "the budget above covers the global updates",
    "apfl": "each client's personal model never leaves it and enters no aggregate, so it costs no privacy budget; "
            "the budget above covers the global updates",
}


def _module_of(parameter: str) -> str:
    """The module a parameter belongs to: ``3`` for ``3.weight``, ``""`` for a top-level parameter."""
    return parameter.rsplit(".", 1)[0] if "." in parameter else ""


def _covered(module: str, names: list[str]) -> bool:
    """Whether ``module`` is one of ``names`` or inside one of them."""
    return any(module == name or module.startswith(name + ".") for name in names)


def module_names(model: nn.Module) -> list[str]:
    """The names of the modules that hold trainable parameters directly, in parameter order."""
    names: list[str] = []
    for name, param in model.named_parameters():
        if param.requires_grad and _module_of(name) not in names:
            names.append(_module_of(name))
    return names


def personal_indices(model: nn.Module, config: PersonalizationConfig) -> np.ndarray:
    """FedPer's personal coordinates of the flat vector (``FlatParams`` order): the parameters of the modules
    named in ``personal_layers`` (a name covers its submodules), by default the last one. One-line errors for a
    name that matches no layer and for a choice that leaves nothing to federate."""
    modules = module_names(model)
    wanted = config.personal_layers or [modules[-1]]
    for name in wanted:
        if not any(_covered(m, [name]) for m in modules):
            raise ScenarioError(f"personalization.personal_layers: {name!r} names no layer of the model; "
                                f"use one of {modules}")
    covered, offset, chosen = set(), 0, []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        module = _module_of(name)
        if _covered(module, wanted):
            chosen.append(np.arange(offset, offset + param.numel()))
            covered.add(module)
        offset += param.numel()
    if covered == set(modules):
        raise ScenarioError(f"personalization.personal_layers: {wanted} makes every layer personal, so nothing is "
                            "federated; keep at least one layer shared")
    return np.concatenate(chosen)


def state_width(config: PersonalizationConfig, dim: int, personal: np.ndarray | None) -> int:
    """The width of a client's personal row, [flag, values]; 0 for finetune, which keeps no state."""
    if config.method == "finetune":
        return 0
    return 1 + (personal.size if config.method == "fedper" else dim)


class Personalization(Stage):
    """The client half of the scenario's personalization method, run after local training."""

    def __init__(self, scenario: Scenario, runtime, personal: np.ndarray | None = None) -> None:
        self.scenario, self.config, self.runtime = scenario, scenario.personalization, runtime
        fedper = self.config.method == "fedper"
        self.personal = personal if runtime is None or not fedper else personal_indices(runtime.model, self.config)
        self.index = self.optimizer = None
        if runtime is not None:
            import torch

            from raysim.client.optimizer import LocalOptimizer

            self.index = None if self.personal is None else torch.from_numpy(self.personal).to(runtime.device)
            self.optimizer = LocalOptimizer(runtime.flat.params, lr=scenario.training.lr)

    def _row(self, chunk: Chunk, k: int) -> torch.Tensor | None:
        """The client's personal values on the device, or None before its first round."""
        import torch

        row = chunk.personal[k]
        return None if row[0] == 0 else torch.from_numpy(np.array(row[1:], dtype=np.float32)).to(self.runtime.device)

    def before_training(self, update: ClientUpdate, chunk: Chunk) -> None:
        if self.config.method != "fedper":
            return
        head = self._row(chunk, update.position)
        if head is not None:  # train from the global body and the client's own head
            start = chunk.global_t.clone()
            start[self.index] = head
            update.start = start

    def client(self, update: ClientUpdate, chunk: Chunk) -> bool:
        method, k = self.config.method, update.position
        if method == "finetune":
            return True
        if method == "fedper":
            local = chunk.global_t[self.index] + update.delta[self.index]
            update.delta[self.index] = 0  # the personal layers never leave the client
            values = local
        else:
            values = self._personal_pass(update, chunk, self._row(chunk, k))
        chunk.personal[k, 0] = 1.0
        chunk.personal[k, 1:] = values.cpu().numpy()
        chunk.personal_done[k] = True
        return True

    def server(self, released: Released, context: object) -> Released:
        """FedPer's server half: the personal coordinates of the sum are exactly zero. The clients zeroed them, but
        secure aggregation's rounding and DP's noise put something there; no server update may touch them."""
        if self.config.method == "fedper" and self.personal is not None:
            for vector in (released.total, released.mean):
                if vector is not None:
                    vector[self.personal] = 0
        return released

    def _personal_pass(self, update: ClientUpdate, chunk: Chunk, v: torch.Tensor | None) -> torch.Tensor:
        """Ditto's or APFL's training of v_k on the client's samples; returns the new v_k."""
        import torch

        from raysim.client.train import train_client

        runtime, training, config = self.runtime, self.scenario.training, self.config
        w = chunk.global_t
        v = w.clone() if v is None else v
        x, y = (torch.from_numpy(a).to(runtime.device) for a in (update.x, update.y))
        rng = client_rng(self.scenario.seed, chunk.round_index, update.client_id, stream=PERSONAL_STREAM)
        epochs = config.personal_epochs if config.personal_epochs is not None else int(chunk.batch.epochs[update.position])
        if config.method == "ditto":
            shrink = training.lr * config.lam
            runtime.flat.load(v)

            def prox(weights: torch.Tensor) -> None:  # v ← (v + ηλ·w) / (1 + ηλ)
                weights.add_(w, alpha=shrink).div_(1.0 + shrink)

            train_client(runtime.model, runtime.flat, self.optimizer, x, y, epochs=epochs,
                         batch_size=training.batch_size, rng=rng, task=runtime.task, after_step=prox)
            return runtime.flat.vector.clone()
        alpha = config.alpha
        local = w + update.delta  # the client's model after this round's local training (personal coordinates too)
        runtime.flat.load(alpha * v + (1 - alpha) * local)
        train_client(runtime.model, runtime.flat, self.optimizer, x, y, epochs=epochs, batch_size=training.batch_size,
                     rng=rng, task=runtime.task, hook=lambda grad, _: grad.mul_(alpha * alpha))
        return (runtime.flat.vector - (1 - alpha) * local) / alpha if alpha > 0 else v


def personalized_vector(config: PersonalizationConfig, global_t: torch.Tensor, row: np.ndarray | None,
                        personal: np.ndarray | None) -> torch.Tensor:
    """The model a client is evaluated with, for fedper, ditto and apfl (the global model before its first round)."""
    import torch

    if row is None or row[0] == 0:
        return global_t
    values = torch.from_numpy(np.array(row[1:], dtype=np.float32)).to(global_t.device)
    if config.method == "fedper":
        out = global_t.clone()
        out[torch.from_numpy(personal).to(global_t.device)] = values
        return out
    if config.method == "ditto":
        return values
    return config.alpha * values + (1 - config.alpha) * global_t


def evaluate_client(scenario: Scenario, runtime, personal: np.ndarray | None, global_t: torch.Tensor,
                    row: np.ndarray | None, train: tuple[np.ndarray, np.ndarray], held: tuple[np.ndarray, np.ndarray],
                    client_id: int, round_index: int) -> tuple[int, int, int]:
    """(correct with the global model, correct with the personalized one, held-out samples) for one client."""
    import torch

    from raysim.client.optimizer import LocalOptimizer
    from raysim.client.train import evaluate, train_client

    x, y = (torch.from_numpy(a).to(runtime.device) for a in held)
    if x.shape[0] == 0:
        return 0, 0, 0
    runtime.flat.load(global_t)
    _, global_correct, count = evaluate(runtime.model, x, y, task=runtime.task)
    config = scenario.personalization
    if config.method == "finetune":
        tx, ty = (torch.from_numpy(a).to(runtime.device) for a in train)
        if config.finetune_epochs and tx.shape[0]:
            optimizer = LocalOptimizer(runtime.flat.params, lr=scenario.training.lr)
            rng = client_rng(scenario.seed, round_index, client_id, stream=FINETUNE_STREAM)
            train_client(runtime.model, runtime.flat, optimizer, tx, ty, epochs=config.finetune_epochs,
                         batch_size=scenario.training.batch_size, rng=rng, task=runtime.task)
    else:
        runtime.flat.load(personalized_vector(config, global_t, row, personal))
    _, personal_correct, _ = evaluate(runtime.model, x, y, task=runtime.task)
    return int(global_correct), int(personal_correct), int(count)


def personal_metrics(global_correct: np.ndarray, personal_correct: np.ndarray, counts: np.ndarray) -> dict[str, object]:
    """One evaluation round's per-client figures: the personalized accuracy's mean, p10, p50 and p90, the global
    model's mean per-client accuracy, the share of clients the personalized model serves better, and the
    per-client accuracies themselves (for ``raysim report``'s distribution plot)."""
    keep = counts > 0
    if not keep.any():
        return {}
    personal, global_ = personal_correct[keep] / counts[keep], global_correct[keep] / counts[keep]
    p10, p50, p90 = np.percentile(personal, [10, 50, 90])
    return {"personal_accuracy_mean": float(personal.mean()), "personal_accuracy_p10": float(p10),
            "personal_accuracy_p50": float(p50), "personal_accuracy_p90": float(p90),
            "personal_global_accuracy_mean": float(global_.mean()),
            "personal_beats_global": float(np.mean(personal > global_)),
            "personal_accuracies": [round(float(a), 6) for a in personal],
            "personal_global_accuracies": [round(float(a), 6) for a in global_]}
