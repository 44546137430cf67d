"""The server core that the sync round server and the async step server are both built on, by composition.

It owns what does not depend on how updates are scheduled: the global model and its strategy, the
per-client state stores (SCAFFOLD's c_i, error-feedback residuals), the DP accountants, the stages'
server halves, evaluation, checkpoints, the worker-failure budget and the run's totals. Given a
reduction it records the per-update metrics both servers report, keeps the clients' new state, and
steps the model through the strategy.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from raysim.client.build import build_pipeline
from raysim.client.personal import PRIVACY_NOTE, personal_indices
from raysim.client.personal import state_width as personal_width
from raysim.client.pipeline import Released
from raysim.client.state import make_state_store
from raysim.compression import dense_bytes
from raysim.compression.downlink import Downlink
from raysim.config import Scenario
from raysim.engine import checkpoint
from raysim.engine.evaluation import Evaluator
from raysim.engine.pool import Prepared, WorkerFailures
from raysim.engine.reduce import Reduction, update_metrics
from raysim.errors import ScenarioError
from raysim.privacy.secagg.sealed_state import sealed_width
from raysim.strategies import Aggregate, ControlUpdate, make_strategy

if TYPE_CHECKING:
    from raysim.privacy.he.params import HEParams


def _public_context(blob: bytes) -> Any:
    """The he backend's public context; refuses one that holds the secret key (the server may never)."""
    from raysim.privacy.he.keys import load_context  # TenSEAL loads only in runs that use it
    context = load_context(blob)
    if context.is_private():
        raise ValueError("the server actor was handed a context with the secret key")
    return context


class ServerCore:
    """The server's state and its updates; see the module docstring. Its process imports no torch: the workers
    build the initial model (``initial``, from ``ClientWorker.initial_vector``) and evaluate it, and only FedPer
    builds a model here, for its layers' coordinates."""

    def __init__(self, scenario: Scenario, workers: list, test: Sequence[Any], feature_shape: tuple[int, ...],
                 num_classes: int, state_dir: str | None = None, dp_total_weight: float = 1.0,
                 prepared: Prepared | None = None, he: tuple[HEParams, bytes] | None = None,
                 initial: np.ndarray | None = None) -> None:
        self.scenario, self.workers = scenario, workers
        if initial is None:  # no worker built it (a server made in a test)
            from raysim.models.initial import initial_global

            initial = initial_global(scenario, feature_shape, num_classes)
        self.global_vec = np.array(initial, dtype=np.float32)
        self.dim = int(self.global_vec.size)
        self.evaluator = Evaluator(scenario, test, num_classes)
        # Under secure aggregation or central/distributed DP clients' state rows are kept sealed, two header words wider.
        self.state_width = sealed_width(self.dim) if scenario.seals_client_state else self.dim
        self.state_dir = state_dir
        store = self._store("client_state") if scenario.strategy.name == "scaffold" else None
        self.strategy = make_strategy(scenario.strategy, num_clients=scenario.num_clients, dim=self.dim, store=store)
        compression = scenario.compression
        self.residuals = self._store("residuals") if compression is not None and compression.error_feedback else None
        self.personal_index, self.personal = None, None
        if scenario.personalization is not None:  # each client's personal row (``raysim.client.personal``)
            if scenario.personalization.method == "fedper":  # one line for a bad layer name
                from raysim.models.initial import initial_model

                self.personal_index = personal_indices(initial_model(scenario, feature_shape, num_classes)[0],
                                                       scenario.personalization)
            width = personal_width(scenario.personalization, self.dim, self.personal_index)
            if width:
                self.personal = self._store("personal", sealed_width(width) if scenario.seals_client_state
                                            else width)
        self.pipeline = build_pipeline(scenario, num_classes, personal_index=self.personal_index)  # its server halves
        self.central_dp = self.local_dp = None
        if scenario.privacy is not None:
            self._privacy(dp_total_weight)
        self.run_dir = None if state_dir is None else Path(state_dir).parent
        # backend: he: the encryption parameters and the public context, which adds but cannot decrypt
        self.he_params, self.he_public = (None, None) if he is None else (he[0], _public_context(he[1]))
        self.failures = WorkerFailures(scenario.executor.max_worker_failures, prepared)  # re-prepares restarted workers
        self.totals = {"bytes_up_total": 0, "bytes_down_total": 0, "worker_failures_total": 0,
                       "client_errors_total": 0, "rejected_total": 0}
        self.downlink = None if scenario.downlink is None else \
            Downlink(scenario.downlink, self.dim, scenario.num_clients, scenario.seed)
        self.sent, self.sent_bytes = self.global_vec, None  # this round's broadcast and its bytes down (downlink)

    def broadcast(self, client_ids: np.ndarray) -> np.ndarray:
        """The model ``client_ids`` train from this round: the global one, or its downlink-compressed x̂."""
        if self.downlink is None:
            self.sent = self.global_vec
        else:
            self.sent, self.sent_bytes = self.downlink.broadcast(self.global_vec, client_ids)
        return self.sent

    def _store(self, name: str, width: int | None = None):
        """A per-client state store of ``strategy.state_store``'s kind (SCAFFOLD's in ``state_dir`` itself), of
        ``width`` (default: the model's, sealed under secure aggregation) per row."""
        backend, width = self.scenario.strategy.state_store, width or self.state_width
        if backend == "memory":
            return make_state_store(backend, width, None)
        return make_state_store(backend, width, self.state_dir if name == "client_state"
                                else Path(self.state_dir) / name)

    def _privacy(self, dp_total_weight: float) -> None:
        """The accountants; Opacus loads only in runs that use them."""
        from raysim.privacy.dp.sampling import denominator_rate
        from raysim.privacy.dp.server import CentralDP, LocalDPLedger

        scenario, privacy = self.scenario, self.scenario.privacy
        if privacy.mechanism == "local":
            self.local_dp = LocalDPLedger(privacy)
            return
        kept_rate = denominator_rate(scenario)  # the accountant gets the worst-case participation rate
        self.central_dp = CentralDP(privacy, sample_rate=scenario.sample_rate, rounds=scenario.rounds,
                                    total_weight=dp_total_weight, expected_cohort=kept_rate * scenario.num_clients,
                                    denominator_rate=kept_rate, blocks=2 if scenario.strategy.name == "scaffold" else 1)

    def stores(self) -> list:
        return [store for store in (getattr(self.strategy, "store", None), self.residuals, self.personal)
                if store is not None]

    def record(self, reduction: Reduction) -> dict[str, Any]:
        """The per-update metrics of ``reduction``; adds them to the totals and keeps the clients' new state."""
        downloads = 1 if self.strategy.server_state() is None else 2
        out = update_metrics(reduction, self.scenario, self.dim, downloads)
        if self.downlink is not None:  # the model's message, then SCAFFOLD's c dense
            out["bytes_down"] = self.sent_bytes + (downloads - 1) * dense_bytes(self.dim) * len(reduction.client_ids)
        self.totals["rejected_total"] += out["rejected"]
        self.totals["client_errors_total"] += out["client_errors"]
        self.totals["bytes_up_total"] += out.get("bytes_up", 0)
        self.totals["bytes_down_total"] += out["bytes_down"]
        kept = reduction.kept_mask
        if self.residuals is not None and reduction.kept:
            self.residuals.put(reduction.client_ids[kept], reduction.residuals[kept])
        if self.local_dp is not None:
            for chunk in reduction.chunks:
                self.local_dp.record(chunk.client_ids, chunk.dp_states, chunk.epsilons)
        if self.personal is not None:  # every client that trained keeps its new personal row, aggregated or not
            for chunk in reduction.chunks:
                if chunk.personal_done is not None and chunk.personal_done.any():
                    self.personal.put(chunk.client_ids[chunk.personal_done], chunk.personal[chunk.personal_done])
        return out

    def budget_gate(self, metrics: dict[str, Any]) -> dict[str, Any] | None:
        """``metrics`` with the DP budget's verdict before a round or server step: ``stopped`` (run no more)
        or ``dp_budget_exceeded`` (warn and go on); None while within the budget, or without one."""
        budget = self.central_dp.budget_check() if self.central_dp is not None else None
        if budget is None or budget.allowed:
            return None
        if self.scenario.privacy.on_budget == "stop":
            return {**metrics, "clients": 0, "stopped": budget.message}
        return {**metrics, "dp_budget_exceeded": budget.message}

    def step(self, released: Released, client_ids: np.ndarray, where: str) -> None:
        """Step the model with what the server halves released (``where``: "round 3", "server step 3")."""
        if released.keep_model:
            return
        mean, weight = released.mean, released.mean_weight
        if mean is None:
            if released.total is None or not released.weight or released.weight <= 0:
                return
            mean, weight = (released.total / released.weight).astype(np.float32), released.weight
        control = None
        if released.control_rows is not None:
            ids = client_ids[released.included]
            control = ControlUpdate(client_ids=ids, delta_sum=released.control_sum,
                                    sealed=released.control_rows if released.sealed else None,
                                    deltas=None if released.sealed else released.control_rows)
        self.apply(Aggregate(mean_delta=mean, total_weight=weight, num_clients=int(released.included.sum()),
                             control=control), where)

    def apply(self, aggregate: Aggregate, where: str) -> None:
        self.global_vec = self.strategy.apply(self.global_vec, aggregate)
        self.check(where)

    def check(self, where: str) -> None:
        """Stop the run, with one line, once the global model is no longer finite."""
        if not np.isfinite(self.global_vec).all():
            raise ScenarioError(f"training.lr: the global model became NaN/Inf in {where}; "
                                "lower training.lr or strategy.server_lr")

    def evaluate(self, round_index: int) -> dict[str, Any]:
        return self.start_evaluation(round_index)()

    def start_evaluation(self, round_index: int) -> Callable[[], dict[str, Any]]:
        """``evaluate`` in two halves where it is only central: the calls go out now and the returned function
        collects the metrics (federated and personalized evaluation run to the end here)."""
        if not self.scenario.evaluation.federated and self.scenario.personalization is None:
            return self.evaluator.start_central(self.global_vec, self.workers, self.failures)
        metrics = self._evaluate_all(round_index)
        return lambda: metrics

    def _evaluate_all(self, round_index: int) -> dict[str, Any]:
        metrics = self.evaluator.central(self.global_vec, self.workers, self.failures)
        if self.scenario.evaluation.federated:
            metrics.update(self.evaluator.federated(self.global_vec, round_index, self.workers, self.failures))
        if self.scenario.personalization is not None:
            metrics.update(self.evaluator.personalized(self.global_vec, round_index, self.workers, self.failures,
                                                       self.personal))
        return metrics

    def privacy_metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.central_dp is not None:
            out.update(self.central_dp.metrics())
        if self.local_dp is not None:
            out.update(self.local_dp.metrics())
        return out

    def privacy_report(self) -> dict[str, Any] | None:
        """The ``privacy`` block of summary.json."""
        from raysim.privacy.dp.sampling import sampling_assumption

        scenario = self.scenario
        report = None
        if self.central_dp is not None:
            report = self.central_dp.report(scenario.privacy.mechanism, scenario.rounds, scenario.sampling.kind,
                                            sampling_assumption(scenario))
        elif self.local_dp is not None:
            report = self.local_dp.report(scenario.rounds, sampling_assumption(scenario))
        if report is not None and scenario.personalization is not None:
            report["personalization"] = PRIVACY_NOTE[scenario.personalization.method]
        return report

    def state(self) -> dict[str, Any]:
        """Everything the next rounds depend on (the stores' rows travel as files; see ``checkpoint``)."""
        for store in self.stores():
            getattr(store, "flush", lambda: None)()
        return {"global_vec": self.global_vec, "strategy": self.strategy, "central_dp": self.central_dp,
                "local_dp": self.local_dp, "residuals": self.residuals, "personal": self.personal,
                "totals": self.totals, "failures": self.failures.count,
                "downlink": None if self.downlink is None else self.downlink.state_dict()}

    def restore(self, state: dict[str, Any]) -> None:
        self.global_vec, self.strategy, self.central_dp = state["global_vec"], state["strategy"], state["central_dp"]
        self.local_dp, self.residuals, self.personal = state["local_dp"], state["residuals"], state.get("personal")
        self.totals, self.failures.count = state["totals"], state["failures"]
        if self.downlink is not None:
            self.downlink.load_state_dict(state["downlink"])

    def close(self) -> None:
        """Flush what outlives the run: the disk-backed client state stores' indexes."""
        for store in self.stores():
            store.close()


class CoreServer:
    """What every server actor answers, delegated to its ``core``; a server adds its own state to checkpoints
    through ``extra_state`` / ``restore_extra``."""

    core: ServerCore

    def extra_state(self) -> dict[str, Any]:
        return {}

    def restore_extra(self, state: dict[str, Any]) -> None:
        """Restore what ``extra_state`` returned."""

    def save_checkpoint(self, rounds_done: int) -> str:
        """Write the checkpoint after ``rounds_done`` rounds into the run folder; returns its path."""
        core = self.core
        state = {**core.state(), **self.extra_state()}
        saved = checkpoint.save(core.run_dir, rounds_done, state, store_dir=core.run_dir / checkpoint.STORE_DIR,
                                keep=core.scenario.checkpoint.keep)
        return str(saved.path)

    def restore_checkpoint(self, path: str, rounds_done: int) -> None:
        """Continue from the checkpoint at ``path``: its client state files, then its state."""
        core, saved = self.core, checkpoint.Checkpoint(rounds_done, Path(path))
        for store in core.stores():
            store.close()
        checkpoint.restore_store_files(saved, core.run_dir / checkpoint.STORE_DIR)
        state = saved.load_state()
        core.restore(state)
        self.restore_extra(state)

    def num_parameters(self) -> int:
        return self.core.dim

    def global_vector(self) -> np.ndarray:
        return self.core.global_vec

    def privacy_report(self) -> dict[str, Any] | None:
        return self.core.privacy_report()

    def close(self) -> None:
        self.core.close()
