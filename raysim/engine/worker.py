"""The worker actor: one execution slot that keeps a model resident and runs the client pipeline over chunks.

A worker is created once per session and warmed up; each run prepares it (``engine.handover``) with the
training arrays (zero-copy views of the object store) and the partition's CSR layout. Each call
carries the round's global vector and a chunk of client ids; the worker runs each client through the
update pipeline (``raysim.client.pipeline``), whose encoding folds their weighted deltas into one
partial sum in client-id order, so the server receives one vector per chunk rather than one per client.
"""

from __future__ import annotations

import gc
import os
import resource
import time

import numpy as np
import ray
import torch

from raysim.client.build import build_pipeline
from raysim.client.encode import Encoding
from raysim.client.messages import ChunkResult, ClientBatch, EvalResult, RoundPlan
from raysim.client.optimizer import LocalOptimizer
from raysim.client.personal import Personalization, evaluate_client
from raysim.client.pipeline import Chunk
from raysim.client.samples import split_holdout
from raysim.client.train import evaluate
from raysim.client.training import ClientRuntime, VectorizedTraining
from raysim.config import Scenario
from raysim.engine.faults import WorkerChaos
from raysim.engine.handover import WorkerNotReady, WorkerSetup, open_sealed
from raysim.models.initial import initial_global
from raysim.models.task import task_for
from raysim.models.zoo import build_model
from raysim.privacy.secagg import PhaseOutput
from raysim.privacy.secagg.sealed_state import RowSealer
from raysim.strategies import make_client_half

__all__ = ["ChunkResult", "ClientBatch", "ClientWorker", "RoundPlan", "pick_device", "warm_up"]


def pick_device(num_gpus: float) -> torch.device:
    """``cuda`` when this worker was given a GPU (or a fraction of one), else the CPU.

    The CUDA allocator is capped to the worker's fraction so four 0.25-GPU workers share one card.
    """
    if num_gpus > 0 and torch.cuda.is_available():
        device = torch.device("cuda", 0)
        if num_gpus < 1:
            torch.cuda.set_per_process_memory_fraction(num_gpus, device)
        return device
    return torch.device("cpu")


def warm_up() -> None:
    """One forward, backward and optimizer step on a throwaway model, so that torch's lazy first-use costs
    (the autograd engine, the kernels' first dispatch) land here rather than in the first round. The step is
    ``LocalOptimizer``'s: ``torch.optim`` would import ``torch._dynamo`` (1.1–1.8 s), which no run needs."""
    model = torch.nn.Linear(2, 2)
    loss = torch.nn.functional.cross_entropy(model(torch.zeros(2, 2)), torch.tensor([0, 1]))
    loss.backward()
    LocalOptimizer(list(model.parameters()), lr=0.1).step()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class ClientWorker:
    """The body of the worker actor; plain Python, so it is also usable without Ray (``ClientWorker.local``).

    A worker outlives runs: the constructor takes only its slot (position and pool secret) and warms torch
    up; ``prepare`` builds a run's model, optimizer, pipeline and data views, and ``release`` drops them.
    Before ``prepare`` any call raises ``WorkerNotReady``, which the pool treats as a lost worker.
    """

    def __init__(self, position: int = 0, num_gpus: float = 0.0, pool_secret: bytes | None = None) -> None:
        self.position, self.pool_secret = position, pool_secret
        self.device = pick_device(num_gpus)
        self.token: str | None = None
        warm_up()

    def __getattr__(self, name: str) -> object:  # only reached for run state that ``prepare`` has not set
        raise WorkerNotReady(self.__dict__.get("position", -1))

    @classmethod
    def local(cls, scenario: Scenario, x_train: np.ndarray, y_train: np.ndarray, part_indices: np.ndarray,
              part_offsets: np.ndarray, feature_shape: tuple[int, ...], num_classes: int,
              client_key: bytes | None = None, he_secret: bytes | None = None) -> ClientWorker:
        """A worker prepared in this process from plain arrays (tests and single-process baselines)."""
        worker = cls(num_gpus=scenario.executor.num_gpus)
        worker.setup(scenario, (x_train, y_train, part_indices, part_offsets), feature_shape, num_classes, client_key,
                     he_secret)
        return worker

    def prepare(self, token: str, setup: list[ray.ObjectRef]) -> int:
        """Hold the run ``token`` names, whose ``WorkerSetup`` is boxed in ``setup`` (a list, so Ray passes the
        reference unresolved); a no-op when this worker already holds it. Returns this worker's position."""
        if self.token != token:
            payload: WorkerSetup = ray.get(setup[0])
            key = None if payload.sealed_client_key is None else open_sealed(self.pool_secret, payload.sealed_client_key)
            he_secret = None if payload.sealed_he_key is None else open_sealed(self.pool_secret, payload.sealed_he_key)
            self.setup(payload.scenario, tuple(ray.get(list(payload.data))), payload.feature_shape, payload.num_classes, key,
                       he_secret)
            self.token = token
            # What the actor holds now (torch, Ray, the run's model: some 200,000 objects) lives as long as the run;
            # left to the cyclic collector, every full collection rescans it (about 90 ms here).
            gc.freeze()
        return self.position

    def setup(self, scenario: Scenario, data: tuple[np.ndarray, ...], feature_shape: tuple[int, ...],
              num_classes: int, client_key: bytes | None = None, he_secret: bytes | None = None) -> None:
        """Build the run's state from ``scenario`` (the model, optimizer, pipeline, data views); ``he_secret`` is
        the he backend's secret context, which the workers' clients hold."""
        self.release()
        self.scenario = scenario
        self.chaos = WorkerChaos(scenario.faults, self.position)
        torch.set_num_threads(max(1, int(scenario.executor.num_cpus)))
        device = self.device
        model = build_model(scenario.model, feature_shape, num_classes, device=device).to(device)
        self.runtime = ClientRuntime.of(scenario, model, task_for(scenario.model), device)
        self.pipeline = build_pipeline(
            scenario, num_classes, runtime=self.runtime, strategy=make_client_half(scenario.strategy, scenario.training.lr),
            sealer=None if client_key is None else RowSealer(client_key),  # secure rounds' client state
            feature_shape=tuple(feature_shape), he_secret=he_secret)
        self.vectorized = isinstance(self.pipeline.stages[0], VectorizedTraining)
        self.encoding: Encoding = self.pipeline.find(Encoding)
        self.x, self.y, self.indices, self.offsets = data
        self.holdout = scenario.evaluation.held_out
        self.feature_shape, self.num_classes = tuple(feature_shape), num_classes

    def release(self) -> None:
        """Drop the run's state, so the object store can free its data once the run ends."""
        self.token = None
        gc.unfreeze()  # the finished run's objects become collectable again (``prepare`` froze them)
        for name in ("scenario", "chaos", "runtime", "pipeline", "vectorized", "encoding", "x", "y", "indices", "offsets", "holdout",
                     "feature_shape", "num_classes"):
            self.__dict__.pop(name, None)

    def _client_arrays(self, client_id: int, held_out: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The client's training (or held-out) samples."""
        own = self.indices[self.offsets[client_id] : self.offsets[client_id + 1]]
        train, holdout = split_holdout(own, self.holdout, self.scenario.seed, client_id)
        chosen = holdout if held_out else train
        return self.x[chosen], self.y[chosen]

    def train(self, global_vec: np.ndarray, server_state: np.ndarray | None, round_index: int,
              plan: RoundPlan, index: int, batch: ClientBatch) -> ChunkResult:
        """Run each client of the batch from ``global_vec`` through the pipeline; return the chunk's result."""
        self.chaos.before_call()
        return self.run_chunk(global_vec, server_state, round_index, plan, index, batch)

    def run_chunk(self, global_vec: np.ndarray, server_state: np.ndarray | None, round_index: int,
                  plan: RoundPlan, index: int, batch: ClientBatch) -> ChunkResult:
        """``train`` without the injected worker faults."""
        chunk = self._chunk(global_vec, server_state, round_index, plan, index, batch)
        self.pipeline.run(chunk, self._client_arrays)
        return chunk.result(rss_mb=_peak_rss_mb())

    def train_pack(self, global_vec: np.ndarray, server_state: np.ndarray | None, round_index: int,
                   plan: RoundPlan, index: int, pack: list[tuple[int, ClientBatch]]) -> list[ChunkResult]:
        """A sync round's call (``raysim.engine.packing``): the chunks of ``pack`` (chunk index, batch), one after
        another, or, vectorized, together; one result per chunk.

        Each chunk still folds alone, so the reduction order is the chunks', whatever calls they were packed into.
        """
        self.chaos.before_call()
        if not self.vectorized:
            return [self.run_chunk(global_vec, server_state, round_index, plan, i, batch) for i, batch in pack]
        return self._together([self._chunk(global_vec, server_state, round_index, plan, i, batch) for i, batch in pack])

    def _together(self, chunks: list[Chunk]) -> list[ChunkResult]:
        """Train ``chunks`` together; each chunk's seconds are its share, by clients, of the call's."""
        start = time.perf_counter()
        self.pipeline.run_together(chunks, self._client_arrays)
        seconds, rss = time.perf_counter() - start, _peak_rss_mb()
        total = sum(len(chunk.batch.client_ids) for chunk in chunks)
        return [chunk.result(rss_mb=rss, seconds=seconds * len(chunk.batch.client_ids) / max(total, 1))
                for chunk in chunks]

    def _chunk(self, global_vec: np.ndarray, server_state: np.ndarray | None, round_index: int,
               plan: RoundPlan, index: int, batch: ClientBatch) -> Chunk:
        device = self.runtime.device
        as_tensor = lambda v: torch.from_numpy(np.array(v, dtype=np.float32)).to(device)  # noqa: E731
        return Chunk(index=index, round_index=round_index, plan=plan, batch=batch, global_t=as_tensor(global_vec),
                     control=None if server_state is None else as_tensor(server_state), dim=self.runtime.flat.size)

    def train_many(self, tasks: list[tuple[int, int, int, ClientBatch, RoundPlan]],
                   *versions: np.ndarray) -> list[ChunkResult]:
        """Async steps: ``train`` for each task (version position, round index, chunk index, batch, plan), in order.

        The launcher packs whatever waits into one call (each task's updates share a start version and a
        staleness, so each folds alone); ``versions`` are the model versions the tasks start from, passed as
        top-level arguments so that Ray hands them over zero-copy from the object store. Vectorized, the
        tasks' clients train together, each from its own task's version.
        """
        self.chaos.before_call()
        if not self.vectorized:
            return [self.run_chunk(versions[position], None, round_index, plan, index, batch)
                    for position, round_index, index, batch, plan in tasks]
        return self._together([self._chunk(versions[position], None, round_index, plan, index, batch)
                               for position, round_index, index, batch, plan in tasks])

    def secure_phase(self, name: str, inbound: object, session_id: bytes) -> PhaseOutput | list[PhaseOutput]:
        """One secure-aggregation phase for this worker's clients of session ``session_id`` (the he backend's
        upload returns a list of outputs)."""
        return self.encoding.secure_phase(name, inbound, session_id)

    def end_secure_round(self, session_id: bytes) -> None:
        """Forget the clients' protocol state once their round is over (their secrets die with it)."""
        self.encoding.end_secure_round(session_id)

    def secure_plain_sum(self, client_ids: list[int], dim: int) -> np.ndarray | None:
        """Σ w·Δ in float64 over ``client_ids`` held here, for ``secure_aggregation.diagnostics``: called by
        the driver, never by the server actor, and never part of the protocol; None when this worker no
        longer holds them (it was restarted). Forgets the plain updates."""
        return None if "encoding" not in self.__dict__ else self.encoding.plain_sum(client_ids, dim)

    def secure_encoded_sum(self, client_ids: list[int]) -> np.ndarray | None:
        """The exact sum of what ``client_ids`` encrypted, for the driver's he_decoding_error (diagnostics only,
        never the server actor's); None when this worker no longer holds them."""
        return None if "encoding" not in self.__dict__ else self.encoding.encoded_sum(client_ids)

    def evaluate(self, global_vec: np.ndarray, index: int, client_ids: np.ndarray) -> EvalResult:
        """Federated evaluation: the global model on each client's held-out samples."""
        runtime = self.runtime
        runtime.flat.load(np.asarray(global_vec, dtype=np.float32))
        total = EvalResult(index=index, loss_sum=0.0, correct=0, samples=0)
        for cid in client_ids.tolist():
            x, y = (torch.from_numpy(a).to(runtime.device) for a in self._client_arrays(cid, held_out=True))
            if x.shape[0]:
                total = total.plus(*evaluate(runtime.model, x, y, task=runtime.task))
        return total

    def evaluate_personal(self, global_vec: np.ndarray, round_index: int, index: int,
                          part: tuple[np.ndarray, np.ndarray | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Personalization: for each client of ``part`` (ids, their personal rows), the held-out samples the global
        model and the client's personalized model get right, and their count."""
        ids, rows = part
        rows = None if rows is None else self.encoding.open_personal(ids, rows)
        global_t = torch.from_numpy(np.array(global_vec, dtype=np.float32)).to(self.runtime.device)
        personal = self.pipeline.find(Personalization).personal
        out = np.zeros((3, len(ids)), dtype=np.int64)
        for k, cid in enumerate(ids.tolist()):
            out[:, k] = evaluate_client(self.scenario, self.runtime, personal, global_t, None if rows is None else rows[k],
                                        self._client_arrays(cid), self._client_arrays(cid, held_out=True), cid,
                                        round_index)
        return out[0], out[1], out[2]

    def evaluate_test(self, global_vec: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, index: int,
                      span: tuple[int, int]) -> EvalResult:
        """Central evaluation on this worker's device, for the server (``raysim.engine.evaluation``): the model
        ``global_vec`` on test samples [start, stop)."""
        runtime = self.runtime
        runtime.flat.load(np.asarray(global_vec, dtype=np.float32))
        x, y = (torch.from_numpy(a[span[0] : span[1]]).to(runtime.device) for a in (x_test, y_test))
        return EvalResult(index, 0.0, 0, 0).plus(*evaluate(runtime.model, x, y, task=runtime.task))

    def initial_vector(self) -> np.ndarray:
        """The run's seeded initial model as a flat vector, built as any process builds it, for the server actor
        (whose process imports no torch)."""
        return initial_global(self.scenario, self.feature_shape, self.num_classes)

    def placement(self) -> dict[str, object]:
        """Where this worker runs: its node, process and device (for tests and reports)."""
        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "pid": os.getpid(), "device": str(self.device),
                "gpu_ids": ray.get_gpu_ids()}
