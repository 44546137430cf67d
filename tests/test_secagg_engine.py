"""Secure aggregation inside the engine: clients in worker actors, the server half in the server actor."""

import numpy as np
import pytest

import raysim
from raysim.config import apply_overrides
from raysim.models.initial import initial_global
from raysim.engine.validation import parse_and_validate as parse_scenario  # the schema and the engine's checks
from raysim.errors import ScenarioError

SECURE = ["secure_aggregation.threshold=0.5"]


def test_secure_fedavg_matches_plain_fedavg_within_half_a_point_and_is_deterministic(ray_session, tiny_scenario):
    rounds = ["rounds=5"]
    plain = raysim.run(tiny_scenario, overrides=[*rounds, "name=plain"])
    secure = raysim.run(tiny_scenario, overrides=[*rounds, *SECURE, "name=secure", "secure_aggregation.diagnostics=true"])
    again = raysim.run(tiny_scenario, overrides=[*rounds, *SECURE, "name=again", "executor.num_workers=1"])
    assert abs(secure.final_accuracy - plain.final_accuracy) <= 0.005
    assert np.array_equal(secure.global_vector, again.global_vector)
    last = secure.history[-1]
    assert last["secagg_aborted"] == 0 and last["secagg_survivors"] == 20
    assert last["secagg_quantization_error"] < 1e-4
    assert last["secagg_client_bytes_sent_mean"] > 0 and last["secagg_server_bytes_received"] > 0


def test_dropouts_in_every_phase_still_release_the_survivors_sum(ray_session, tiny_scenario):
    phases = ["advertise_keys", "share_keys", "masked_input", "unmasking"]
    result = raysim.run(tiny_scenario, overrides=[*SECURE, "secure_aggregation.threshold=0.4", "secure_aggregation.diagnostics=true",
                                                  *(f"secure_aggregation.dropout.{p}=0.08" for p in phases)])
    for phase in phases:
        assert sum(m[f"secagg_{phase}_dropouts"] for m in result.history) > 0, phase
    assert all(m["secagg_aborted"] == 0 for m in result.history)
    assert all(m["secagg_survivors"] < 20 for m in result.history)
    # The released sum is exactly the survivors' (up to quantization): the driver checks it against their plain sum.
    assert max(m["secagg_quantization_error"] for m in result.history) < 1e-4
    assert "secagg_quantization_error" not in raysim.run(tiny_scenario, overrides=[*SECURE, "rounds=1"]).history[0]


def test_too_many_dropouts_abort_every_round_and_leave_the_initial_model(ray_session, tiny_scenario):
    aborted = raysim.run(tiny_scenario, overrides=[
        "rounds=2", "secure_aggregation.threshold=15", "secure_aggregation.dropout.masked_input=0.9"])
    assert all(m["secagg_aborted"] == 1 for m in aborted.history)
    scenario = parse_scenario(tiny_scenario)
    assert np.array_equal(aborted.global_vector, initial_global(scenario, (16,), 5))  # nothing was released


@pytest.mark.parametrize(("algorithm", "graph"), [
    (["strategy.name=scaffold"], []),
    (["strategy.name=fedprox", "strategy.mu=0.1"], []),
    (["strategy.name=fedadam", "strategy.server_lr=0.01"], ["secure_aggregation.neighbours=10"]),
])
def test_secure_aggregation_composes_with_every_algorithm_and_the_sparse_graph(ray_session, tiny_scenario, algorithm, graph):
    plain = raysim.run(tiny_scenario, overrides=[*algorithm, "name=plain"])
    secure = raysim.run(tiny_scenario, overrides=[*algorithm, *SECURE, *graph])
    assert all(m["secagg_aborted"] == 0 for m in secure.history)
    # The same model as the plain run up to quantization, round after round (SCAFFOLD's sealed c_i included).
    start = initial_global(parse_scenario(tiny_scenario), (16,), 5)
    moved = np.linalg.norm(plain.global_vector - start)
    assert np.linalg.norm(secure.global_vector - plain.global_vector) < 1e-3 * moved
    assert abs(secure.final_accuracy - plain.final_accuracy) <= 0.01


@pytest.mark.parametrize(("overrides", "field"), [
    (["secure_aggregation.threshold=25"], "secure_aggregation.threshold"),
    (["secure_aggregation.neighbours=20"], "secure_aggregation.neighbours"),
    (["secure_aggregation.modulus_bits=8", "secure_aggregation.quant_bits=6"], "secure_aggregation.modulus_bits"),
    (["secure_aggregation.dropout.masked_input=1.5"], "secure_aggregation.dropout"),
])
def test_impossible_secure_aggregation_settings_name_their_field(tiny_scenario, overrides, field):
    with pytest.raises(ScenarioError, match=field.replace(".", r"\.")):
        parse_scenario(apply_overrides(tiny_scenario, overrides))
