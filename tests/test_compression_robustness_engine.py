"""Compression, robust aggregation and attacks through the engine: exact bytes, error feedback state,
the shared random mask under secure aggregation, determinism, and the combinations that are refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import raysim
from raysim.compression import dense_bytes, keep_count
from raysim.config import load_scenario, parse_scenario
from raysim.data.load import load_data
from raysim.models.initial import initial_global
from raysim.errors import ScenarioError
from raysim.models.zoo import build_model

pytestmark = pytest.mark.usefixtures("ray_session")


def _run(tmp_path, raw, name, **extra):
    return raysim.run(parse_scenario({**raw, **extra, "name": name, "output": {"dir": str(tmp_path)}}))


_RUNS: dict[str, raysim.Result] = {}


def _shared(tmp_path, raw, name, **extra):
    """``_run``, once per session for a given scenario (several tests read the same run)."""
    if name not in _RUNS:
        _RUNS[name] = _run(tmp_path, raw, name, **extra)
    return _RUNS[name]


TOPK = {"kind": "topk", "fraction": 0.1}


def _load(run_dir, vector: np.ndarray | None = None) -> tuple:
    """A run's scenario, its dataset and its model architecture holding the flat ``vector`` (if given)."""
    scenario = load_scenario(run_dir / "config.yaml")
    data = load_data(scenario)
    model = build_model(scenario.model, data.feature_shape, data.num_classes)
    if vector is not None:
        torch.nn.utils.vector_to_parameters(torch.tensor(vector, dtype=torch.float32), model.parameters())
    return scenario, data, model


def _majority_share(run_dir) -> float:
    _, data, _ = _load(run_dir)
    return float(np.bincount(np.asarray(data.y_test)).max() / len(data.y_test))


def _untrained(run_dir) -> np.ndarray:
    scenario, data, _ = _load(run_dir)
    return initial_global(scenario, data.feature_shape, data.num_classes)


def test_top_k_uploads_exactly_its_encoded_bytes_and_the_ratio_follows(tmp_path, tiny_scenario):
    raw = {**tiny_scenario, "rounds": 2}
    sparse = _shared(tmp_path, raw, "topk", compression=TOPK)
    dim = sparse.summary["num_parameters"]  # 16·32 + 32 + 32·5 + 5 = 709 < 2^16: 2-byte indices
    k = keep_count(dim, 0.1)
    assert dense_bytes(dim) == 5 + 4 * dim
    for compressed in sparse.history:
        assert compressed["bytes_up"] == compressed["kept"] * (9 + k * (2 + 4))
        assert compressed["compression_ratio"] == pytest.approx((5 + 4 * dim) / (9 + 6 * k))
        assert compressed["bytes_down"] == compressed["clients"] * dense_bytes(dim)  # downloads stay dense
    assert sparse.summary["final"]["bytes_up_total"] == sum(m["bytes_up"] for m in sparse.history)


def test_error_feedback_changes_the_model_and_is_deterministic_across_workers(tmp_path, tiny_scenario):
    raw = {**tiny_scenario, "rounds": 2}
    ef = {"compression": {**TOPK, "error_feedback": True}}
    one = _run(tmp_path, {**raw, "executor": {"num_workers": 1, "clients_per_call": 4}}, "ef1", **ef)
    two = _run(tmp_path, raw, "ef2", **ef)
    np.testing.assert_array_equal(one.global_vector, two.global_vector)
    assert not np.array_equal(one.global_vector, _shared(tmp_path, raw, "topk", compression=TOPK).global_vector)


def test_the_shared_random_mask_composes_with_secure_aggregation(tmp_path, tiny_scenario):
    raw = {**tiny_scenario, "rounds": 1}
    mask = {"compression": {"kind": "random_mask", "fraction": 0.25, "error_feedback": True}}
    plain = _run(tmp_path, raw, "mask", **mask)
    secure = _run(tmp_path, raw, "secure-mask", secure_aggregation={"threshold": 0.6}, **mask)
    dense_secure = _run(tmp_path, raw, "secure", secure_aggregation={"threshold": 0.6})
    # Only the mask's k coordinates are masked and summed: the same model up to SecAgg's quantization,
    np.testing.assert_allclose(secure.global_vector, plain.global_vector, atol=2e-3)
    # and only k of the d ring words on the wire (the protocol's keys and shares are the same).
    sent, dense_sent = (r.history[0]["secagg_client_bytes_sent_mean"] for r in (secure, dense_secure))
    dim = plain.summary["num_parameters"]
    assert (dense_sent - sent) / (dim - keep_count(dim, 0.25)) in (4, 8)  # 32- or 64-bit ring words


BOOSTED = {"fraction": 0.1, "attack": "scaling", "scale": 1000.0}  # 20 of 200: at most 4 of a round's 20 here


# Each rule's accuracy after 2 rounds under the attack, less a margin (clean FedAvg: 0.56; boosted FedAvg: 0.14).
@pytest.mark.parametrize(("rule", "floor"), [({"rule": "median"}, 0.47 - 0.05),
                                             ({"rule": "multikrum", "byzantine": 4}, 0.53 - 0.05)],
                         ids=["median", "multikrum"])
def test_robust_rules_resist_boosted_attackers(tmp_path, tiny_scenario, rule, floor):
    raw = {**tiny_scenario, "rounds": 2, "adversary": BOOSTED}
    robust = _run(tmp_path, raw, "robust", aggregation=rule)
    mean = _shared(tmp_path, raw, "boosted-mean", aggregation={"rule": "mean"})  # the control: the same attack on FedAvg
    assert [m["malicious"] for m in robust.history] == [m["malicious"] for m in mean.history]
    assert 0 < max(m["malicious"] for m in robust.history) <= 4
    chance = _majority_share(robust.run_dir)  # what a constant prediction scores on this test set
    initial = np.linalg.norm(_untrained(robust.run_dir))
    assert mean.final_accuracy < chance + 0.1 and np.linalg.norm(mean.global_vector) > 100 * initial  # FedAvg collapses
    assert robust.final_accuracy > max(floor, chance + 0.2)  # 5 classes; the majority class is 21% of the test set
    assert np.linalg.norm(robust.global_vector) < 2 * initial


def test_attacks_are_deterministic_under_the_seed_and_report_backdoor_accuracy(tmp_path, tiny_scenario):
    raw = {**tiny_scenario, "rounds": 2, "adversary": {"fraction": 0.2, "attack": "backdoor", "target_label": 1}}
    first, again = _run(tmp_path, raw, "a"), _run(tmp_path, {**raw, "executor": {"num_workers": 1}}, "b")
    np.testing.assert_array_equal(first.global_vector, again.global_vector)
    assert [m["malicious"] for m in first.history] == [m["malicious"] for m in again.history]
    assert sum(m["malicious"] for m in first.history) > 0
    # The metric recomputed here: non-target test samples, last 3 features set to 3.0, predicted as label 1.
    _, data, model = _load(first.run_dir, first.global_vector)
    keep = np.asarray(data.y_test) != 1
    triggered = np.array(data.x_test[keep], dtype=np.float32)
    triggered[:, -3:] = 3.0
    with torch.no_grad():
        predicted = model(torch.from_numpy(triggered)).argmax(1).numpy()
        clean = model(torch.as_tensor(np.asarray(data.x_test))).argmax(1).numpy()
    assert first.summary["final"]["backdoor_accuracy"] == pytest.approx((predicted == 1).mean(), abs=1e-12)
    assert first.final_accuracy == pytest.approx((clean == np.asarray(data.y_test)).mean(), abs=1e-12)
    # The attack took: the trigger sends 89% of them to label 1, against 47% of the same samples without it.
    assert first.summary["final"]["backdoor_accuracy"] > (clean[keep] == 1).mean() + 0.3


@pytest.mark.parametrize("extra, field", [
    ({"aggregation": {"rule": "median"}, "secure_aggregation": {}}, "aggregation.rule"),
    ({"aggregation": {"rule": "krum", "byzantine": 9}}, "aggregation.byzantine"),
    ({"compression": {"kind": "topk"}, "secure_aggregation": {}}, "compression.kind"),
    ({"adversary": {"attack": "backdoor", "target_label": 7}}, "adversary.target_label"),
    ({"adversary": {"attack": "backdoor", "trigger_size": 17}}, "adversary.trigger_size"),
])
def test_combinations_that_cannot_compose_are_refused_with_the_field(tmp_path, tiny_scenario, extra, field):
    with pytest.raises(ScenarioError, match=field.replace(".", r"\.")):
        raysim.run(parse_scenario({**tiny_scenario, **extra, "output": {"dir": str(tmp_path)}}))


def test_keep_count_is_the_ceiling_of_the_fraction():
    assert keep_count(709, 0.1) == math.ceil(70.9)
