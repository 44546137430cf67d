"""The server actor's inbox in a secure round: every message it receives, checked for plaintext updates.

The server body (``RoundServer``) runs in this process against real worker actors, and every value
that reaches it through ``ray.get`` is recorded: the workers' chunk results and every phase's
messages. No vector among them may correlate with a client's update, a worker's partial sum or the
round's total, which an independent in-process worker computes from the same seeds. Only the
protocol's output, the unmasked sum, is the server's to learn, and it never arrives as a message.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import ray
import torch

from raysim.compression import shared_mask_indices
from raysim.config import apply_overrides, parse_scenario
from raysim.data.load import load_data, partition_data
from raysim.engine.pool import create_workers
from raysim.engine.sampling import sample_clients
from raysim.engine.evaluation import chunked
from raysim.engine.server import RoundServer, local_epochs
from raysim.models.initial import initial_global
from raysim.engine.worker import ClientBatch, ClientWorker, RoundPlan
from raysim.privacy.he import generate_keys
from raysim.privacy.he.protocol import DecryptedSum, EncryptedUpdate
from raysim.privacy.he.setup import run_params
from raysim.privacy.secagg.client import PhaseOutput
from raysim.privacy.secagg.sealed_state import new_storage_key

SECURE = ["secure_aggregation.threshold=0.5", "rounds=1", "executor.num_workers=2"]
SIGMAS = 6  # a leak correlates far beyond chance: |rank correlation| > max(0.5, 6/sqrt(length))


def _arrays(value):
    """Every numpy array inside ``value``, through dicts, sequences and dataclasses."""
    if isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _arrays(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _arrays(item)
    elif isinstance(value, bytes) and len(value) >= 64:  # ciphertexts, keys, shares: read as floats and words too
        for dtype in (np.dtype(np.float32), np.dtype(np.int64)):
            yield np.frombuffer(value[: len(value) // dtype.itemsize * dtype.itemsize], dtype=dtype)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _arrays(getattr(value, f.name))


def _rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's ρ: Pearson's on ranks, so a masked word or a sealed float's random bits (heavy-tailed
    when read as a float) correlate with nothing, and a plaintext vector ranks like the secret."""
    with np.errstate(invalid="ignore", over="ignore"):
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    ra, rb = np.argsort(np.argsort(a)).astype(np.float64), np.argsort(np.argsort(b)).astype(np.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    norm = np.linalg.norm(ra) * np.linalg.norm(rb)
    return float(ra @ rb / norm) if norm > 0 else 0.0


def leaks(inbox: list, secrets: list[np.ndarray]) -> list[float]:
    """The rank correlations beyond chance between any inbound vector (any row, at any plausible offset: a masked
    input holds [Δ, Δc, w], a sealed row a two-word header) and any of ``secrets``."""
    found = []
    for array in (a for value in inbox for a in _arrays(value)):
        if not np.issubdtype(array.dtype, np.number):
            continue
        for row in np.atleast_2d(array.reshape(array.shape[0], -1) if array.ndim > 1 else array):
            for secret in secrets:
                size = secret.size
                bound = max(0.5, SIGMAS / np.sqrt(size))
                for offset in {0, 1, 2, size, row.size - size - 1, row.size - size}:
                    if 0 <= offset <= row.size - size:
                        rho = _rank_correlation(row[offset : offset + size], secret)
                        if abs(rho) > bound:
                            found.append(rho)
    return found


@pytest.fixture
def inbox_of(free_cluster, tiny_scenario, tmp_path, monkeypatch):
    """Run round 0 of a secure scenario with the server body here; return its inbox and the secrets."""
    threads = torch.get_num_threads()

    def run(overrides: list[str]) -> tuple[list, list[np.ndarray], dict]:
        scenario = parse_scenario(apply_overrides(tiny_scenario, [*SECURE, *overrides]))
        dataset = load_data(scenario)
        part = partition_data(scenario, dataset)
        refs = [ray.put(a) for a in (dataset.x_train, dataset.y_train, part.indices, part.offsets)]
        he = None
        if scenario.secure_aggregation.backend == "he":  # the key authority's part, as the runner plays it
            params, _ = run_params(scenario, initial_global(scenario, dataset.feature_shape, dataset.num_classes).size)
            he = (params, generate_keys(params))
        workers, prepared = create_workers(scenario, 2, refs, dataset.feature_shape, dataset.num_classes,
                                           client_key=new_storage_key(), he_secret=None if he is None else he[1].secret)
        inbox: list = []
        real_get = ray.get

        def recording_get(*args, **kwargs):
            value = real_get(*args, **kwargs)
            inbox.append(value)
            return value

        try:
            server = RoundServer(scenario, workers, (dataset.x_test, dataset.y_test), dataset.feature_shape,
                                 dataset.num_classes, str(tmp_path / "state"), float(part.sizes().max()),
                                 prepared=prepared, he=None if he is None else (he[0], he[1].public))
            start = server.core.global_vec.copy()
            monkeypatch.setattr(ray, "get", recording_get)
            metrics = server.run_round(0)
            monkeypatch.setattr(ray, "get", real_get)
        finally:
            for worker in workers:
                ray.kill(worker)
        # The same round's plaintext updates, from an independent in-process worker without secure aggregation.
        plain = parse_scenario(apply_overrides(tiny_scenario, [*SECURE[1:], *overrides, "secure_aggregation=null",
                                                               "compression=null", "strategy.name=fedavg"]))
        reference = ClientWorker.local(plain, dataset.x_train, dataset.y_train, part.indices, part.offsets,
                                 dataset.feature_shape, dataset.num_classes)
        sampled = sample_clients(scenario.sampling, scenario.num_clients, scenario.seed, 0)
        chunk = reference.train(start, None, 0, RoundPlan(per_client=True), 0,
                                ClientBatch(sampled, local_epochs(scenario, sampled, 0)))
        weighted = chunk.rows.astype(np.float64) * chunk.weights[:, None]
        size = scenario.executor.clients_per_call
        partial = [part_rows.sum(axis=0) for part_rows in chunked(weighted, size)]
        secrets = [*chunk.rows, *partial, weighted.sum(axis=0)]
        if scenario.compression is not None:  # the shared mask's k coordinates travel on their own
            seed = int(np.random.default_rng([scenario.seed, 0, 31]).integers(2**63))  # the round's public mask seed
            mask = shared_mask_indices(start.size, scenario.compression.fraction, seed)
            secrets += [s[mask] for s in secrets]
        torch.set_num_threads(threads)
        return inbox, secrets, metrics

    return run


@pytest.mark.parametrize("overrides", [
    ["strategy.name=scaffold", "secure_aggregation.diagnostics=true"],
    ["compression.kind=random_mask", "compression.fraction=0.1", "compression.error_feedback=true"],
], ids=["scaffold-diagnostics", "random-mask-error-feedback"])
def test_the_server_actor_receives_no_plaintext_update_or_partial_sum(inbox_of, overrides):
    inbox, secrets, metrics = inbox_of(overrides)
    assert metrics["secagg_aborted"] == 0 and metrics["kept"] == 20
    masked = [a for value in inbox for a in _arrays(value) if a.dtype == np.uint32]
    assert len(masked) >= 20  # the masked inputs were among the messages scanned
    assert leaks(inbox, secrets) == []
    # The scan finds a leak where there is one: a client's update, a partial sum, or a residual-like 90%.
    update, partial = secrets[0], secrets[20]
    residual = update.copy()
    residual[: update.size // 10] = 0
    assert len(leaks([update.astype(np.float32), {"sum": partial}, (residual,)], secrets)) >= 3


def test_under_he_the_server_actor_receives_ciphertexts_and_the_release_only(inbox_of):
    inbox, secrets, metrics = inbox_of(["secure_aggregation.backend=he", "strategy.name=scaffold",
                                        "secure_aggregation.diagnostics=true"])
    assert metrics["secagg_aborted"] == 0 and metrics["kept"] == 20
    replies = [m for value in inbox if isinstance(value, list) for out in value if isinstance(out, PhaseOutput)
               for m in out.messages.values()] + \
              [m for out in inbox if isinstance(out, PhaseOutput) for m in out.messages.values()]
    assert sum(isinstance(m, EncryptedUpdate) for m in replies) == 20
    assert sum(isinstance(m, DecryptedSum) for m in replies) == 1  # the decryptor's reply: the round's release
    # Everything else, the ciphertexts read as floats and as words included, correlates with no client's
    # update and no worker's partial sum.
    rest = [dataclasses.replace(out, messages={u: m for u, m in out.messages.items() if not isinstance(m, DecryptedSum)})
            if isinstance(out, PhaseOutput) else out for value in inbox
            for out in (value if isinstance(value, list) else [value])]
    assert leaks(rest, secrets) == []
    # A plaintext update serialized to bytes among them would be found.
    assert leaks([secrets[0].astype(np.float32).tobytes()], secrets)
