"""Packing a sync round's chunks into one call per worker (``raysim.engine.packing``).

The planner is checked on its own: consecutive chunks, every chunk once, one pack per worker that is up,
shares that follow the measured rates. That packing never changes a result is the worker-count tests'
(1 and 2 workers give the same model: ``test_engine``, ``test_vectorized``) and a run with a delayed worker's.
"""

from __future__ import annotations

import numpy as np

import raysim
from raysim.client.messages import ChunkResult, ClientBatch
from raysim.config import parse_scenario
from raysim.engine.packing import PACK_BYTES, PackPlanner


def _batches(sizes: list[int]) -> list[ClientBatch]:
    ids = np.arange(sum(sizes))
    bounds = np.cumsum([0, *sizes])
    return [ClientBatch(ids[a:b], np.ones(b - a, dtype=np.int64)) for a, b in zip(bounds[:-1], bounds[1:])]


def _result(batch: ClientBatch, steps_each: int) -> ChunkResult:
    n = len(batch.client_ids)
    return ChunkResult(index=0, delta_sum=np.zeros(1), weight_sum=float(n), client_ids=batch.client_ids,
                       weights=np.ones(n), losses=np.zeros(n), steps=np.full(n, steps_each))


def _clients(pack) -> int:
    return sum(len(batch.client_ids) for _, batch in pack)


def test_unmeasured_workers_share_the_clients_equally_in_consecutive_chunks() -> None:
    batches = _batches([5] * 10)
    packs = PackPlanner(2, chunk_bytes=8).packs(batches, [0, 1])
    assert [_clients(p) for p in packs] == [25, 25]
    assert [index for pack in packs for index, _ in pack] == list(range(10))  # every chunk once, in order


def test_shares_follow_the_measured_rates() -> None:
    planner, batches = PackPlanner(2, chunk_bytes=8), _batches([5] * 12)
    packs = planner.packs(batches, [0, 1])
    results = [[_result(b, 4) for _, b in pack] for pack in packs]
    planner.observe(results, {0: 0, 1: 1}, {0: 1.0, 1: 2.0})  # worker 0 trained its steps twice as fast
    assert [_clients(p) for p in planner.packs(batches, [0, 1])] == [40, 20]
    planner.observe(results, {0: 1, 1: 0}, {0: 1.0, 1: 1.0})  # smoothed: one round moves a rate halfway
    np.testing.assert_allclose(planner.rates, [120, (60 + 120) / 2])  # 120 steps in 1 s on each worker


def test_every_worker_that_is_up_gets_a_chunk_and_lost_workers_none() -> None:
    planner, batches = PackPlanner(3, chunk_bytes=8), _batches([5] * 4)
    planner.rates[:] = [1000.0, 1.0, 1.0]  # a fast worker would take all, but each gets one
    packs = planner.packs(batches, [0, 1, 2])
    assert len(packs) == 3 and all(packs)
    assert len(planner.packs(batches, [2])) == 1  # workers 0 and 1 are down: one pack, for worker 2
    assert [len(p) for p in PackPlanner(4, chunk_bytes=8).packs(_batches([5, 5]), [0, 1, 2, 3])] == [1, 1]


def test_results_past_the_byte_budget_go_out_in_smaller_packs() -> None:
    planner = PackPlanner(2, chunk_bytes=PACK_BYTES // 3)  # three chunks' results fill a call
    packs = planner.packs(_batches([5] * 10), [0, 1])
    assert [len(p) for p in packs] == [3, 3, 3, 1]
    assert [index for pack in packs for index, _ in pack] == list(range(10))
    assert [len(p) for p in planner.packs(_batches([5] * 6), [0, 1])] == [3, 3]  # within budget: one pack each


def test_a_delayed_worker_skews_the_packs_but_not_the_model(tmp_path, tiny_scenario) -> None:
    raw = {**tiny_scenario, "rounds": 4, "executor": {**tiny_scenario["executor"], "num_workers": 2, "clients_per_call": 2}}
    plain = raysim.run(parse_scenario({**raw, "output": {"dir": str(tmp_path / "a")}}))
    slow = raysim.run(parse_scenario({**raw, "faults": {"delay_worker": 0, "delay_seconds": 0.3},
                                      "output": {"dir": str(tmp_path / "b")}}))
    np.testing.assert_array_equal(slow.global_vector, plain.global_vector)


def test_packs_share_out_local_steps_not_clients() -> None:
    """Ten chunks of five clients; the first five chunks' clients take 10 steps an epoch, the last five's 1. Shared
    by clients, the first worker would get 5 × 50 = 250 steps and the second 25; shared by steps, 150 and 125."""
    batches = _batches([5] * 10)
    steps_per_epoch = np.array([10] * 25 + [1] * 25)
    packs = PackPlanner(2, chunk_bytes=8).packs(batches, [0, 1], steps_per_epoch)
    steps = [sum(int(np.dot(b.epochs, steps_per_epoch[b.client_ids])) for _, b in pack) for pack in packs]
    assert steps == [150, 125]
    assert [index for pack in packs for index, _ in pack] == list(range(10))
