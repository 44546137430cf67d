"""Downlink compression: the broadcast clients train from, and the exact bytes each of them downloads."""

from __future__ import annotations

import math

import numpy as np
import pytest

import raysim
from raysim.adversary.lab import LeakageView
from raysim.compression import dense_bytes
from raysim.compression.downlink import Downlink
from raysim.config import DownlinkConfig, apply_overrides, parse_scenario
from raysim.engine import checkpoint
from raysim.models.initial import initial_global
from raysim.engine.runner import execute

QUANTIZE_HEADER = 5 + 9  # kind and dimension, then bits, min and max (codec.py's table)


def test_a_quantized_model_broadcast_costs_its_message_for_every_client():
    x = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    link = Downlink(DownlinkConfig(of="model", bits=4), 1000, num_clients=10, seed=0)
    sent, down = link.broadcast(x, np.arange(3))
    assert down == 3 * (QUANTIZE_HEADER + math.ceil(1000 * 4 / 8))
    step = (x.max() - x.min()) / 15
    assert np.abs(sent - x).max() <= step * (1 + 1e-5) and np.abs(sent - x).max() > step / 4


def test_a_delta_broadcast_feeds_back_what_it_dropped_and_charges_catch_up_or_the_dense_replica():
    x = np.random.default_rng(1).normal(size=1000).astype(np.float32)
    link = Downlink(DownlinkConfig(of="delta", kind="topk", fraction=0.1), 1000, num_clients=10, seed=0)
    message = 5 + 4 + 100 * (2 + 4)  # topk: header, k, then k uint16 indices and k float32 values
    sent, down = link.broadcast(np.zeros(1000, np.float32), np.arange(10))
    assert down == 10 * dense_bytes(1000)  # nobody holds a replica yet
    for _ in range(10):  # the same target: the top 10% of what is still missing goes out each time
        sent, _ = link.broadcast(x, np.array([0]))
    assert np.allclose(sent, x, atol=1e-6)
    _, down = link.broadcast(x, np.array([0, 1]))  # client 0 missed nothing; client 1 missed 11 broadcasts
    assert down == message + dense_bytes(1000)
    _, down = link.broadcast(x, np.array([1]))
    assert down == message


def test_a_whole_model_needs_quantize():
    with pytest.raises(ValueError, match="downlink.kind"):
        DownlinkConfig(of="model", kind="topk")


def test_clients_train_from_the_broadcast_and_bytes_down_are_its_messages(ray_session, tiny_scenario):
    model8 = ["downlink.of=model", "downlink.bits=8", "leakage.rounds=[1]"]
    run = raysim.run(tiny_scenario, overrides=[*model8, "name=dl"])
    one = raysim.run(tiny_scenario, overrides=[*model8, "name=dl1", "executor.num_workers=1"])
    plain = raysim.run(tiny_scenario, overrides=["name=plain"])
    assert np.array_equal(run.global_vector, one.global_vector)
    assert not np.array_equal(run.global_vector, plain.global_vector)
    d = run.global_vector.size
    assert [m["bytes_down"] for m in run.history] == [m["clients"] * (QUANTIZE_HEADER + d) for m in run.history]
    assert [m["bytes_down"] for m in plain.history] == [m["clients"] * dense_bytes(d) for m in plain.history]
    # What the server records as the model the round's clients started from is that broadcast.
    scenario = parse_scenario(apply_overrides(tiny_scenario, model8))
    x0 = initial_global(scenario, (16,), 5)
    expected, _ = Downlink(scenario.downlink, d, scenario.num_clients, scenario.seed).broadcast(x0, np.arange(20))
    assert np.array_equal(LeakageView.load(run.run_dir, 1).global_vec, expected)
    assert not np.array_equal(expected, x0)



def test_a_resumed_delta_broadcast_continues_from_the_checkpointed_replica(ray_session, tiny_scenario):
    delta = ["downlink.of=delta", "downlink.kind=topk", "downlink.fraction=0.2", "rounds=4", "checkpoint.every=2"]
    full = raysim.run(tiny_scenario, overrides=[*delta, "name=dl_resume"])
    assert checkpoint.latest(full.run_dir).rounds_done == 2
    resumed = execute(parse_scenario(apply_overrides(tiny_scenario, [*delta, "name=dl_resume"])), resume=full.run_dir)
    assert resumed.summary["resumed_after_round"] == 2
    assert np.array_equal(resumed.global_vector, full.global_vector)
    assert [m["bytes_down"] for m in resumed.history] == [m["bytes_down"] for m in full.history]
