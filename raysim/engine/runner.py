"""The round driver: loads data once (beside ``ray.init``), takes the session's pool and server actor, and
runs the rounds.

The driver process owns nothing but tracking: the server actor owns the model and the strategy, the
workers own training. Data goes into the object store exactly once. The server actor runs on the
driver's node, since it writes the run folder: checkpoints every ``checkpoint.every`` rounds, and
after the round in flight when SIGINT or SIGTERM arrives. ``execute(..., resume=run_dir)`` restores
the newest checkpoint and drops any metrics line logged after it, so nothing is duplicated.
"""

from __future__ import annotations

import resource
import signal
import sys
import threading
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import ray
from threadpoolctl import threadpool_limits

from raysim.adversary.clients import check_labels
from raysim.client.samples import train_sizes
from raysim.config import Scenario
from raysim.config.compat import vectorize_choice
from raysim.data.load import load_data, partition_data
from raysim.data.partition import summarize
from raysim.engine import checkpoint
from raysim.engine.cluster import plan_workers
from raysim.engine.secure import decoding_error, quantization_error
from raysim.engine.session import Session, current
from raysim.engine.startup import Background, StartupProfile
from raysim.engine.system_model import client_system
from raysim.engine.validation import validate
from raysim.errors import ScenarioError
from raysim.privacy.secagg.sealed_state import new_storage_key
from raysim.atomic import write_atomic
from raysim.tracking import RunFolder, Tracker


@dataclass
class Result:
    """What ``raysim.run`` returns: the run folder, the per-round history, the summary and the final model."""

    run_dir: Path
    summary: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    global_vector: np.ndarray | None = None
    round_seconds: list[float] = field(default_factory=list)  # each from the previous round's metrics to its own
    startup: StartupProfile | None = None

    @property
    def final_accuracy(self) -> float | None:
        return self.summary.get("final", {}).get("accuracy")


def _unwrap(err: ray.exceptions.RayTaskError) -> Exception:
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, ScenarioError) else err


class Interrupted(Exception):
    """The run stopped on SIGINT or SIGTERM after finishing a round and checkpointing it."""

    def __init__(self, signum: int, rounds_done: int, run_dir: Path) -> None:
        self.signum, self.rounds_done, self.run_dir = signum, rounds_done, run_dir
        super().__init__(f"stopped by {signal.Signals(signum).name} after round {rounds_done}; "
                         f"resume with: raysim resume {run_dir}")


@contextmanager
def _deferred_signals() -> Iterator[dict[str, int]]:
    """SIGINT and SIGTERM only set a flag, so the round in flight finishes and is checkpointed."""
    caught: dict[str, int] = {}
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: object) -> None:
        if "signum" in caught:  # a second signal: stop now
            signal.signal(signum, previous[signum])
            signal.raise_signal(signum)
        caught["signum"] = signum
        print(f"raysim: {signal.Signals(signum).name}: finishing the round and checkpointing "
              "(send it again to stop at once)", file=sys.stderr)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield caught
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def execute(scenario: Scenario, address: str | None = None, resume: Path | None = None,
            session: Session | None = None) -> Result:
    """Run ``scenario`` to completion in ``session`` (by default the one entered in this process, else a
    temporary one on the embedded local Ray or the cluster at ``address``).

    With ``resume`` (a run folder), continue that run from its newest checkpoint; the result is
    bit-identical to an uninterrupted run.
    """
    profile = StartupProfile()
    temporary = session is None and current() is None
    session = session or current() or Session(address)
    clean = False
    try:
        result = _execute(scenario, session, resume, profile)
        clean = True
        return result
    except (ScenarioError, Interrupted):
        clean = True
        raise
    finally:
        if temporary:
            session.close()
        elif session.connected:
            session.end_run(clean)


def _load(scenario: Scenario) -> tuple[Any, Any, Any, RunKeys | None, Any]:
    """What needs no Ray: the actors' modules, the checks, the data, its partition and the clients' systems,
    the he backend's keys and local DP-SGD's solved noise (run beside ``ray.init``)."""
    import raysim.engine.server_host  # noqa: F401  the actors' classes (shells: no torch in the driver)
    import raysim.engine.worker_actor  # noqa: F401

    # One BLAS thread here: this runs while ray.init starts processes, and OpenBLAS's pool, shut down by its
    # fork handler in the middle of a call on this thread, left a run spinning forever in the data's matmuls.
    with threadpool_limits(limits=1, user_api="blas"):
        return _load_data(scenario)


def _load_data(scenario: Scenario) -> tuple[Any, Any, Any, RunKeys | None, Any]:
    validate(scenario)
    dataset = load_data(scenario)
    part = partition_data(scenario, dataset)
    system = client_system(scenario, part.sizes())  # a malformed trace fails here, before any actor starts
    if scenario.adversary is not None:
        check_labels(scenario.adversary, dataset.num_classes, dataset.feature_shape)
    return (dataset, part, system, _key_authority(scenario, dataset.feature_shape, dataset.num_classes),
            _local_noise(scenario, part.sizes()))


def _local_noise(scenario: Scenario, sizes: np.ndarray) -> Any:
    """Local DP-SGD with a target ε: the z every client's worst case needs (None otherwise)."""
    privacy = scenario.privacy
    if privacy is None or privacy.mechanism != "local" or privacy.target_epsilon is None:
        return None
    from raysim.privacy.dp.local_target import local_noise_for_target

    return local_noise_for_target(privacy.target_epsilon, train_sizes(sizes, scenario.evaluation.held_out),
                                  batch_size=scenario.training.batch_size, epochs=scenario.training.epochs,
                                  rounds=scenario.rounds, delta=privacy.delta, accountant=privacy.accountant)


@dataclass(frozen=True)
class RunKeys:
    """The he backend's run: its parameters, the words per update, and the key pair (``privacy.he.keys``)."""

    params: Any
    words: int
    keys: Any

    def report(self) -> dict[str, Any]:
        """What the run prints and ``summary.json`` records: the parameters, never a key."""
        p = self.params
        return {"scheme": p.scheme, "poly_modulus_degree": p.poly_modulus_degree,
                "coeff_mod_bit_sizes": list(p.coeff_mod_bit_sizes), "security_bits": p.security_bits,
                "plain_modulus": p.plain_modulus, "scale_bits": p.scale_bits, "words_per_update": self.words,
                "ciphertexts_per_update": p.ciphertexts(self.words), "public_context_bytes": len(self.keys.public),
                "secret_context_bytes": len(self.keys.secret)}


def _key_authority(scenario: Scenario, feature_shape: tuple[int, ...], num_classes: int) -> RunKeys | None:
    """backend: he: this process is the key authority. It chooses the parameters from the model's size and the
    largest cohort, and makes the run's key pair: the secret context goes to the workers only, sealed, and
    the public one to the server actor."""
    config = scenario.secure_aggregation
    if config is None or config.backend != "he":
        return None
    from raysim.models.initial import initial_global
    from raysim.privacy.he.keys import generate_keys
    from raysim.privacy.he.setup import run_params

    params, words = run_params(scenario, int(initial_global(scenario, feature_shape, num_classes).size))
    return RunKeys(params, words, generate_keys(params))


def _execute(scenario: Scenario, session: Session, resume: Path | None, profile: StartupProfile) -> Result:
    started = time.perf_counter()
    saved = None if resume is None else checkpoint.latest(resume)
    loading = Background(profile, "checks, data load and partition (beside ray.init)", _load, scenario)
    try:
        with profile.span("ray.init" if not session.connected else "ray (connected)"):
            session.start()
    except BaseException:
        loading.result()  # a scenario's error wins over Ray's
        raise
    with profile.span("actors requested (they start and warm up in parallel)"):
        try:
            num_workers = plan_workers(scenario.executor, ray.cluster_resources())
        except ScenarioError:
            loading.result()  # the data's error first, as when nothing overlapped
            raise
        pool, host = session.pool(scenario.executor, num_workers), session.server_host()
    dataset, part, system, he, noise = loading.result()
    if resume is None:
        folder = RunFolder.create(scenario)
        folder.write_config(scenario)  # as written: a resumed run solves its noise again, to the same z
        folder.write_json("partition.json", summarize(part, dataset.y_train, dataset.num_classes, seed=scenario.seed))
    else:
        folder = RunFolder(resume)
    if noise is not None:  # the workers and the server run with the solved z
        scenario = scenario.model_copy(update={"privacy": scenario.privacy.model_copy(
            update={"noise_multiplier": noise.noise_multiplier})})
    history = folder.keep_metrics(0 if saved is None else saved.rounds_done)
    session.notices.to(folder.path / "ray.log")  # Ray's notices, off the console
    with profile.span("ray.put"):
        data_refs = [ray.put(a) for a in (dataset.x_train, dataset.y_train, part.indices, part.offsets)]
        test_refs = [ray.put(dataset.x_test), ray.put(dataset.y_test)]
    with profile.span("actors ready: start-up, warm-up and the run handed over"):
        prepared, calls = pool.prepare(scenario, data_refs, dataset.feature_shape, dataset.num_classes,
                                       client_key=_client_storage_key(scenario, folder.path),
                                       he_secret=None if he is None else he.keys.secret)
        extra = {} if scenario.privacy is None else {"dp_total_weight": dp_total_weight(scenario, part.sizes())}
        if scenario.asynchronous is None:  # the sync server shares each round's local steps out between workers
            extra["train_sizes"] = train_sizes(part.sizes(), scenario.evaluation.held_out)
        if he is not None:
            extra["he"] = (he.params, he.keys.public)
        # The server actor imports no torch: a worker builds the initial model (Ray hands the server the vector,
        # as ``start`` begins) and the workers evaluate, on the test set's references (a list: not resolved).
        calls.append(host.start.remote(
            scenario.asynchronous is not None, scenario, pool.workers, test_refs, dataset.feature_shape,
            dataset.num_classes, str(folder.path / checkpoint.STORE_DIR), float(max(part.sizes().max(), 1)),
            system=system, prepared=prepared, initial=pool.workers[0].initial_vector.remote(), **extra))
        del dataset, part  # the object store holds the only copy from here on
        try:
            ray.get(calls)
        except ray.exceptions.RayTaskError as err:
            raise _unwrap(err) from None
    tracker: Tracker | None = None
    try:
        first = 0
        if saved is not None:
            ray.get(host.restore_checkpoint.remote(str(saved.path), saved.rounds_done))
            first = saved.rounds_done
            print(f"raysim: resuming {folder.path} after round {first}", file=sys.stderr)
        if he is not None:
            print(f"raysim: homomorphic aggregation: {he.params.describe(he.words)}", file=sys.stderr)
        if noise is not None:
            print(f"raysim: local DP-SGD: {noise.describe(scenario.rounds)}", file=sys.stderr)
        if scenario.training.vectorize is not False:  # the run says once which it chose, and why
            on, why = vectorize_choice(scenario)
            print(f"raysim: vectorized training {'on' if on else 'off'} ({why})", file=sys.stderr)
        tracker = Tracker(folder, scenario, done=first)
        round_seconds: list[float] = []
        rounds_started = time.perf_counter()
        _run_rounds(scenario, host, pool.workers, first, history, tracker, folder, round_seconds, profile)
        final_vec = ray.get(host.global_vector.remote())
        ray.get(host.close.remote())
        privacy = ray.get(host.privacy_report.remote()) if scenario.privacy is not None else None
        rounds_seconds = time.perf_counter() - rounds_started
        folder.write_model(final_vec)
        summary = _summary(scenario, num_workers, final_vec, history, started, len(round_seconds), rounds_seconds)
        summary["startup"] = profile.table()
        if saved is not None:
            summary["resumed_after_round"] = saved.rounds_done
        if privacy is not None:
            summary["privacy"] = privacy if noise is None else {**privacy, "noise_solved": noise.describe(scenario.rounds)}
        if he is not None:
            summary["he"] = he.report()
        if scenario.training.vectorize is not False:
            summary["vectorize"] = dict(zip(("on", "why"), vectorize_choice(scenario)))
        folder.write_json("summary.json", summary)
        tracker.finish(summary)
        return Result(run_dir=folder.path, summary=summary, history=history, global_vector=final_vec,
                      round_seconds=round_seconds, startup=profile)
    finally:
        folder.sync_metrics()  # at the end, whether the run finished or not
        if tracker is not None:
            tracker.abort()


def _run_rounds(scenario: Scenario, server: Any, workers: list, first: int, history: list[dict[str, Any]],
                tracker: Tracker, folder: RunFolder, round_seconds: list[float], profile: StartupProfile) -> None:
    """Rounds ``first``.. to the end (or a DP budget's stop), logging and checkpointing; a SIGINT or SIGTERM
    ends the run after the rounds in flight, with a checkpoint.

    While rounds take under ``AHEAD_SECONDS``, the next round is asked for before this one's metrics
    arrive, so the server actor goes from one round to the next without waiting for this process (a round
    trip of 1–2 ms on 2 busy cores): not across a checkpoint or secure aggregation's diagnostics, which
    this process handles between two rounds. The server runs its calls in order, so the rounds and the
    model are the same either way. A round asked for ahead is always run and logged (Ray cannot withdraw
    a call from an actor that has it), so a signal may wait for that one round more.
    """
    every = scenario.checkpoint.every
    diagnostics = scenario.secure_aggregation is not None and scenario.secure_aggregation.diagnostics
    with _deferred_signals() as caught:
        ahead: ray.ObjectRef | None = None  # the next round's call, asked for ahead
        try:
            for round_index in range(first, scenario.rounds):
                done = round_index + 1
                if ahead is None:
                    call, tick = server.run_round.remote(round_index), time.perf_counter()
                else:  # its time started when the last round's metrics were logged
                    call, ahead = ahead, None
                quick = bool(round_seconds) and round_seconds[-1] < AHEAD_SECONDS
                if quick and not diagnostics and not caught and done < scenario.rounds and done % every:
                    ahead = server.run_round.remote(done)
                metrics = ray.get(call)
                if diagnostics:  # the plain sums go to this process, never to the server actor
                    release = ray.get(server.secure_release.remote())
                    if release is not None:
                        if release.encoded_sum is not None:  # he: before the plain sums, which forget the updates
                            metrics["he_decoding_error"] = decoding_error(workers, release)
                        metrics["secagg_quantization_error"] = quantization_error(workers, release)
                if "stopped" in metrics:  # a round asked for ahead stops as well, without training
                    print(f"raysim: stopping after round {round_index}: {metrics['stopped']}", file=sys.stderr)
                    break
                if "dp_budget_exceeded" in metrics and not any("dp_budget_exceeded" in m for m in history):
                    print(f"raysim: warning: {metrics['dp_budget_exceeded']}", file=sys.stderr)
                history.append(metrics)
                tracker.log(metrics)
                round_seconds.append(time.perf_counter() - tick)
                tick = time.perf_counter()  # where a round asked for ahead starts its time
                if round_index == first:
                    profile.add("first round", time.time() - round_seconds[-1], round_seconds[-1])
                if ahead is None and (caught or (done % every == 0 and done < scenario.rounds)):
                    ray.get(server.save_checkpoint.remote(done))
                    folder.sync_metrics()
                if ahead is None and caught:
                    raise Interrupted(caught["signum"], done, folder.path)
        except ray.exceptions.RayTaskError as err:
            raise _unwrap(err) from None
        finally:
            if ahead is not None:  # after a failed or stopped round: let the server finish the next, whatever it gives
                with suppress(Exception):
                    ray.get(ahead)


AHEAD_SECONDS = 1.0  # rounds shorter than this are asked for ahead: the saved round trip matters, the wait is short


def _summary(scenario: Scenario, num_workers: int, final_vec: np.ndarray, history: list[dict[str, Any]],
             started: float, ran: int, rounds_seconds: float) -> dict[str, Any]:
    return {
        "name": scenario.name, "rounds": scenario.rounds, "num_clients": scenario.num_clients,
        "workers": num_workers, "num_parameters": int(final_vec.size),
        "final": _final_metrics(history),
        "wall_seconds": time.perf_counter() - started,
        "rounds_per_second": ran / rounds_seconds if rounds_seconds > 0 else 0.0,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # the driver's peak
    }


CLIENT_KEY_FILE = "client_storage.key"


def _client_storage_key(scenario: Scenario, run_dir: Path) -> bytes | None:
    """The simulated clients' storage key, for secure or DP runs whose clients keep state between rounds.

    It seals SCAFFOLD's c_i and error-feedback residuals, which the server keeps (sealed_state.py). It is
    the simulated devices' storage, not a credential, and lives in the run folder (mode 0600) so that a
    resumed run's clients can read their state; only the workers receive it, never the server actor.
    """
    stateful = scenario.strategy.name == "scaffold" or (scenario.compression is not None and scenario.compression.error_feedback) \
        or (scenario.personalization is not None and scenario.personalization.method != "finetune")
    if not scenario.seals_client_state or not stateful:
        return None
    path = run_dir / CLIENT_KEY_FILE
    if path.exists():
        return path.read_bytes()
    key = new_storage_key()
    write_atomic(path, key, mode=0o600)
    return key


def dp_total_weight(scenario: Scenario, sizes: np.ndarray) -> float:
    """W = Σ_k w_k over the population, with DP-FedAvg's capped weights w_k = min(n_k / cap, 1)."""
    cap = scenario.privacy.weight_cap
    return float(np.minimum(sizes / cap, 1.0).sum()) if cap else float(len(sizes))


def _final_metrics(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The last value of every metric over the run (evaluation may not run every round)."""
    final: dict[str, Any] = {}
    for metrics in history:
        final.update({k: v for k, v in metrics.items() if v is not None})
    return final
