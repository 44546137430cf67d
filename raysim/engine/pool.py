"""The worker pool: creating worker actors, keeping a bounded number of calls in flight on each, and
surviving workers that die.

Results are returned in chunk order, whatever order Ray completes them in, so every reduction the
server does afterwards is independent of timing and of the number of workers. Workers are started
with unlimited Ray restarts; when a worker process dies mid-call (killed, out of memory, its node
lost) its calls are re-run on the workers still up, and Ray brings it back, on any node with room,
to rejoin once it answers. Training is a pure function of (model version, client, round seed), so
a re-run returns exactly what the lost call would have. ``WorkerFailures`` tracks which workers are
down, counts the deaths and stops the run once its budget is spent.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import ray

from raysim.config import ExecutorConfig, Scenario
from raysim.engine.handover import WorkerNotReady, WorkerSetup, seal_for_workers
from raysim.errors import ScenarioError, first_line

# WorkerNotReady: a call reached a worker Ray restarted, which holds no run until it is prepared again.
WORKER_LOST = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError,
               ray.exceptions.ObjectLostError, ray.exceptions.NodeDiedError, WorkerNotReady)


INLINE_BYTES = 64 * 1024  # under Ray's max_direct_call_object_size (100 KiB), with room for a call's other arguments
_RETRIES_PER_DEATH = 60  # calls lost on a worker that is down before it counts as dead again


class WorkerFailures:
    """Which workers are down, and how many deaths so far; past ``budget`` of them the run stops with
    one line (its checkpoints kept).

    Every call in flight on a worker that dies is lost, so a death is counted once, when a worker
    that last answered fails. A dead worker is *down*: no call goes to it while another worker is
    up, so its calls move to the survivors at once, and a cheap probe call, checked without
    waiting, tells when Ray has it back (restarted on any node with room, such as one an autoscaler
    added for a lost node). When every worker is down, calls go to all of them after a backoff.
    """

    def __init__(self, budget: int, prepared: Prepared | None = None) -> None:
        self.budget, self.count = budget, 0
        # The probe prepares a restarted worker for the run again; without a run it only asks where it is.
        self.probe: Callable[[ray.actor.ActorHandle], ray.ObjectRef] = (
            (lambda worker: worker.placement.remote()) if prepared is None else prepared.call)
        self.down: dict[int, int] = {}  # worker position → calls lost since its death was counted
        self.probes: dict[int, ray.ObjectRef] = {}

    def lost(self, position: int, err: BaseException) -> None:
        retries = self.down.get(position)
        if retries is None or retries >= _RETRIES_PER_DEATH:
            self.count += 1
            retries = 0
            if self.count > self.budget:
                raise ScenarioError(
                    f"executor.max_worker_failures: {self.count} worker failures exceed the budget of {self.budget} "
                    f"(last: {first_line(err, 160)}); fix the cause or raise the budget, then resume "
                    "from the last checkpoint"
                )
        if position >= 0:
            self.down[position] = retries + 1

    def alive(self, position: int) -> None:
        self.down.pop(position, None)
        self.probes.pop(position, None)

    def wait_up(self, workers: Sequence[ray.actor.ActorHandle], seconds: float = 120.0) -> None:
        """Block until every down worker answers a probe, or ``seconds`` pass (a lost node may not return)."""
        deadline = time.monotonic() + seconds
        while self.down and time.monotonic() < deadline:
            self.up(workers)
            time.sleep(0.1)

    def up(self, workers: Sequence[ray.actor.ActorHandle]) -> list[int]:
        """The positions to send calls to."""
        for position in list(self.down):
            probe = self.probes.get(position)
            if probe is not None and ray.wait([probe], timeout=0)[0]:
                try:
                    ray.get(probe)
                    self.alive(position)
                    continue
                except WORKER_LOST:
                    probe = None
            if probe is None:
                self.probes[position] = self.probe(workers[position])
        live = [position for position in range(len(workers)) if position not in self.down]
        if live:
            return live
        time.sleep(min(0.05 * 2 ** min(self.down.values()), 1.0))
        return list(range(len(workers)))


def lost_position(err: BaseException, workers: Sequence[ray.actor.ActorHandle]) -> int:
    """The position of the worker a RayActorError (or a WorkerNotReady) is about (-1 when it names none of them)."""
    position = getattr(getattr(err, "cause", err), "position", None)
    if isinstance(position, int):
        return position
    actor_id = getattr(err, "actor_id", None)
    ids = [w._actor_id.hex() for w in workers]
    return ids.index(actor_id) if actor_id in ids else -1


@dataclass(frozen=True)
class Prepared:
    """A run the pool's workers hold: its token and its ``WorkerSetup``, boxed so Ray passes the reference."""

    token: str
    boxed: list[ray.ObjectRef]

    def call(self, worker: ray.actor.ActorHandle) -> ray.ObjectRef:
        """Prepare ``worker`` for this run (a no-op on a worker that holds it); returns its position."""
        return worker.prepare.remote(self.token, self.boxed)


class WorkerPool:
    """``num_workers`` worker actors of one resource shape, restarted by Ray when they die and reused across runs.

    The actors are created at once and warm torch up in their constructors, in parallel; a run hands them
    its data afterwards (``prepare``), so no constructor argument lives in the object store and a restarted
    actor is prepared again from the run's payload. The pool's secret, given to the workers at creation,
    seals the clients' storage key on its way through the server actor.
    """

    def __init__(self, executor: ExecutorConfig, num_workers: int, worker_class: type | None = None) -> None:
        if worker_class is None:
            from raysim.engine.worker_actor import WorkerActor as worker_class  # the driver needs no torch
        self.shape = shape_of(executor, num_workers)
        self.secret = secrets.token_bytes(32)
        actor = ray.remote(num_cpus=executor.num_cpus, num_gpus=executor.num_gpus, max_restarts=-1)(worker_class)
        self.workers = [actor.remote(k, executor.num_gpus, self.secret) for k in range(num_workers)]

    def prepare(self, scenario: Scenario, data_refs: Sequence[ray.ObjectRef], feature_shape: tuple[int, ...],
                num_classes: int, client_key: bytes | None = None,
                he_secret: bytes | None = None) -> tuple[Prepared, list[ray.ObjectRef]]:
        """Hand every worker the run; returns it and the calls to wait for, once, with whatever else starts
        (the first wait also covers the workers' start-up).

        ``client_key`` is the simulated clients' storage key (``privacy.secagg.sealed_state``): it travels sealed
        under the pool's secret, so only the workers can read it, never the server actor; so does ``he_secret``,
        the he backend's secret context.
        """
        sealed = None if client_key is None else seal_for_workers(self.secret, client_key)
        sealed_he = None if he_secret is None else seal_for_workers(self.secret, he_secret)
        setup = WorkerSetup(uuid.uuid4().hex, scenario, tuple(data_refs), tuple(feature_shape), int(num_classes), sealed,
                            sealed_he)
        prepared = Prepared(setup.token, [ray.put(setup)])
        return prepared, [prepared.call(worker) for worker in self.workers]

    def release(self) -> bool:
        """Make every worker drop the finished run's state (and its zero-copy views of the run's data); False
        when one could not, and the pool was stopped instead (a worker that cannot release is not reused)."""
        try:
            ray.get([worker.release.remote() for worker in self.workers], timeout=60)
            return True
        except (*WORKER_LOST, ray.exceptions.GetTimeoutError):
            self.kill()
            return False

    def kill(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []


def shape_of(executor: ExecutorConfig, num_workers: int) -> tuple[float, float, int]:
    """What a pool's actors are sized by: a run with another shape needs new actors."""
    return float(executor.num_cpus), float(executor.num_gpus), int(num_workers)


def create_workers(scenario: Scenario, num_workers: int, data_refs: Sequence[ray.ObjectRef], feature_shape: tuple[int, ...],
                   num_classes: int, worker_class: type | None = None,
                   client_key: bytes | None = None,
                   he_secret: bytes | None = None) -> tuple[list[ray.actor.ActorHandle], Prepared]:
    """A fresh pool of ``num_workers`` workers prepared for ``scenario``: its actors and the run they hold."""
    pool = WorkerPool(scenario.executor, num_workers, worker_class)
    prepared, calls = pool.prepare(scenario, data_refs, feature_shape, num_classes, client_key, he_secret)
    ray.get(calls)
    return pool.workers, prepared


def shared_argument(array: np.ndarray) -> np.ndarray | ray.ObjectRef:
    """An array every call of a round takes: in the calls themselves when small (Ray copies arguments under
    ``INLINE_BYTES`` into the call, which beats a round trip through the object store: 2–4 ms of a 45 ms
    round on 2 cores, ``scripts/bench_overhead.py``), else put once and shared by reference."""
    return array if array.nbytes <= INLINE_BYTES else ray.put(array)


def map_chunks(
    workers: Sequence[ray.actor.ActorHandle], method: str, chunks: Sequence[Any], common: tuple, in_flight: int,
    placement: dict[int, int] | None = None, failures: WorkerFailures | None = None, rerun: bool = True,
    seconds: dict[int, float] | None = None,
) -> list[Any]:
    """Call ``worker.method(*common, index, chunk)`` for every chunk; results in chunk order.

    Each worker keeps up to ``in_flight`` calls queued so it never waits for the driver between calls;
    a worker that finishes a call is handed the next chunk (dynamic load balancing). ``placement``,
    when given, is filled with chunk index → worker position, for calls that must follow a chunk, and
    ``seconds`` with chunk index → seconds from its call's submit to its result.
    A call lost with its worker is counted in ``failures`` and re-run on a worker that is up; with
    ``rerun`` False the calls still running are waited for and the loss is raised instead (a secure
    round starts over, and no call of the abandoned attempt may touch the workers afterwards).
    """
    return ChunkCalls(workers, method, chunks, common, in_flight, placement, failures, rerun, seconds).results()


class ChunkCalls:
    """``map_chunks`` in two halves: the constructor sends the first calls, ``results`` collects them all (sending
    the rest as workers free up), so a caller can queue other work on the workers in between."""

    def __init__(self, workers: Sequence[ray.actor.ActorHandle], method: str, chunks: Sequence[Any], common: tuple,
                 in_flight: int, placement: dict[int, int] | None = None, failures: WorkerFailures | None = None,
                 rerun: bool = True, seconds: dict[int, float] | None = None) -> None:
        self.workers, self.method, self.chunks, self.common = workers, method, chunks, common
        self.placement, self.rerun, self.seconds = placement, rerun, seconds
        self.failures = failures or WorkerFailures(0)
        self.queue = deque(range(len(chunks)))
        self.pending: dict[ray.ObjectRef, tuple[int, int, float]] = {}
        self.load = [0] * len(workers)
        for _ in range(in_flight):
            for position in self.failures.up(workers):
                if self.queue:
                    self._submit(position)

    def _submit(self, position: int) -> None:
        index = self.queue.popleft()
        ref = getattr(self.workers[position], self.method).remote(*self.common, index, self.chunks[index])
        self.pending[ref] = (position, index, time.perf_counter())
        self.load[position] += 1
        if self.placement is not None:
            self.placement[index] = position

    def results(self) -> list[Any]:
        results: list[Any] = [None] * len(self.chunks)
        pending, failures = self.pending, self.failures
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            position, index, submitted = pending.pop(ready[0])
            self.load[position] -= 1
            try:
                results[index] = ray.get(ready[0])
                failures.alive(position)
                if self.seconds is not None:
                    self.seconds[index] = time.perf_counter() - submitted
            except WORKER_LOST as err:
                failures.lost(position, err)
                if not self.rerun:
                    ray.wait(list(pending), num_returns=len(pending))
                    raise
                self.queue.appendleft(index)
                position = min(failures.up(self.workers), key=self.load.__getitem__)  # the least busy worker that is up
            if self.queue:
                self._submit(position)
        return results
