"""Personalized FL: FedPer's layers stay on the client, Ditto's pull, APFL's mix, fine-tuning, per-client
evaluation, personal state across resume and under secure aggregation, and the one-line refusals."""

import dataclasses
import shutil

import numpy as np
import pytest
import torch

import raysim
from raysim.client.personal import module_names, personal_indices
from raysim.config import apply_overrides
from raysim.models.initial import initial_global
from raysim.engine.runner import execute
from raysim.engine.validation import parse_and_validate
from raysim.engine.worker import ClientBatch, ClientWorker, RoundPlan
from raysim.errors import ScenarioError
from raysim.models.zoo import build_model
from raysim.privacy.secagg.sealed_state import new_storage_key, sealed_width
from raysim.privacy.secagg.setup import SecureRound, decode_sum, round_params
from raysim.report import write_report

pytestmark = pytest.mark.usefixtures("ray_session")

SKEW = ["num_clients=50", "sampling.clients_per_round=25", "partition.alpha=0.2", "partition.min_size=5", "evaluation.federated=true", "evaluation.federated_clients=20", "rounds=4",
        "evaluation.every=2"]


def _run(tiny_scenario, *overrides: str) -> raysim.Result:
    return raysim.run(tiny_scenario, overrides=[*SKEW, *overrides])


def _head(tiny_scenario) -> np.ndarray:
    scenario = parse_and_validate(apply_overrides(tiny_scenario, [*SKEW, "personalization.method=fedper"]))
    return personal_indices(build_model(scenario.model, (16,), 5), scenario.personalization)


def test_fedper_keeps_the_head_out_of_every_aggregate_with_or_without_secure_aggregation(tiny_scenario):
    head = _head(tiny_scenario)
    assert head.size == 32 * 5 + 5  # the MLP 16-32-5's last layer
    start = initial_global(parse_and_validate(apply_overrides(tiny_scenario, SKEW)), (16,), 5)
    plain = _run(tiny_scenario, "personalization.method=fedper")
    secure = _run(tiny_scenario, "personalization.method=fedper", "secure_aggregation.threshold=0.5")
    for result in (plain, secure):
        assert np.array_equal(result.global_vector[head], start[head])  # bit-identical: never aggregated
        body = np.setdiff1d(np.arange(start.size), head)
        assert not np.array_equal(result.global_vector[body], start[body])  # the body is federated
        last = result.history[-1]
        # Each client's own head serves its label-skewed data far better than the untrained global head.
        assert last["personal_accuracy_mean"] > last["personal_global_accuracy_mean"] + 0.2
        assert last["personal_beats_global"] >= 0.75 and len(last["personal_accuracies"]) == 20
    # The same body either way: the secure sum releases the plain one up to quantization.
    assert np.abs(secure.global_vector - plain.global_vector).max() < 1e-3
    written = write_report([plain.run_dir, secure.run_dir], plain.run_dir / "report")
    assert plain.run_dir / "report" / "per_client_accuracy.png" in written


def test_no_aggregate_a_server_sees_holds_fedper_s_personal_layers(tiny_scenario):
    fedper = [*SKEW, "personalization.method=fedper"]
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(60, 16)).astype(np.float32), rng.integers(0, 5, 60)
    threads = torch.get_num_threads()

    def worker_of(overrides: list[str], **keys) -> ClientWorker:
        scenario = parse_and_validate(apply_overrides(tiny_scenario, overrides))
        made = ClientWorker.local(scenario, x, y, np.arange(60), np.arange(0, 61, 20), (16,), 5, **keys)
        torch.set_num_threads(threads)
        return made

    worker = worker_of(fedper)
    head, start = _head(tiny_scenario), worker.runtime.flat.numpy()
    batch = ClientBatch(np.arange(3), np.ones(3, dtype=np.int64), personal=np.zeros((3, 1 + head.size), np.float32))
    plain = worker.train(start, None, 0, RoundPlan(per_client=True), 0, batch)
    assert (plain.rows[:, head] == 0).all() and np.abs(plain.rows).max() > 0  # each update, as a robust rule sees it
    folded = worker.train(start, None, 0, RoundPlan(), 1, batch)
    assert (folded.delta_sum[head] == 0).all()  # the partial sum the server adds up
    # Under secure aggregation: each client's ring vector, decoded alone, is zero there up to one rounding step.
    worker = worker_of([*fedper, "secure_aggregation.threshold=0.5"], client_key=new_storage_key())
    config = worker.scenario.secure_aggregation
    secure = SecureRound(config, round_params(config, 3), b"p" * 16, 100.0)
    sealed = np.zeros((3, sealed_width(1 + head.size)), np.float32)
    worker.train(start, None, 0, RoundPlan(secure=secure), 2, dataclasses.replace(batch, personal=sealed))
    step = 2 * config.clip_range / ((1 << secure.params.quant_bits) - 1) * 100.0
    for ring in worker.encoding.groups[secure.session_id].inputs.values():
        weighted, _, _ = decode_sum(ring, 1, start.size, 100.0, config, secure.params)
        assert np.abs(weighted[head]).max() <= step and np.abs(weighted).max() > 10 * step


def test_fedper_in_fedbuff_keeps_its_head_and_personalizes(tiny_scenario):
    fedbuff = ["system.speed.kind=lognormal", "system.speed.mean=100", "system.speed.sigma=1", "asynchronous.mode=fedbuff",
               "asynchronous.concurrency=10", "asynchronous.buffer_size=5", "rounds=12", "evaluation.every=12"]
    result = _run(tiny_scenario, *fedbuff, "personalization.method=fedper")
    head = _head(tiny_scenario)
    start = initial_global(parse_and_validate(apply_overrides(tiny_scenario, SKEW)), (16,), 5)
    assert np.array_equal(result.global_vector[head], start[head])
    last = result.history[-1]
    assert last["personal_accuracy_mean"] > last["personal_global_accuracy_mean"] + 0.1


def test_fedper_heads_differ_per_client(tiny_scenario):
    result = _run(tiny_scenario, "personalization.method=fedper")
    accuracies = np.array(result.history[-1]["personal_accuracies"])
    global_ = np.array(result.history[-1]["personal_global_accuracies"])
    assert len(set(np.round(accuracies - global_, 6))) > 5  # not one shared head: the gains differ client by client


def _personal_rows(tiny_scenario, *overrides: str) -> tuple[np.ndarray, np.ndarray]:
    """The global vector and the personal rows [flag, v_k] that three clients' round leaves, in this process."""
    scenario = parse_and_validate(apply_overrides(tiny_scenario, [*SKEW, *overrides]))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 16)).astype(np.float32), rng.integers(0, 5, 60)
    threads = torch.get_num_threads()
    worker = ClientWorker.local(scenario, x, y, np.arange(60), np.arange(0, 61, 20), (16,), 5)
    torch.set_num_threads(threads)
    start = worker.runtime.flat.numpy()
    rows = np.zeros((3, 1 + start.size), dtype=np.float32)
    result = worker.train(start, None, 0, RoundPlan(), 0, ClientBatch(np.arange(3), np.ones(3, dtype=np.int64),
                                                                      personal=rows))
    assert result.personal_done.all() and (result.personal[:, 0] == 1).all()
    return start, result.personal[:, 1:]


def test_ditto_with_an_infinite_pull_is_the_global_model_on_every_client(tiny_scenario):
    start, pulled = _personal_rows(tiny_scenario, "personalization.method=ditto", "personalization.lam=1e12")
    for v in pulled:  # v_k = w, to float32 rounding
        np.testing.assert_allclose(v, start, rtol=1e-6, atol=1e-9)
    _, free = _personal_rows(tiny_scenario, "personalization.method=ditto", "personalization.lam=0")
    assert min(np.abs(v - start).max() for v in free) > 1e-3 and np.abs(free[0] - free[1]).max() > 1e-3
    # In the engine, Ditto's global update is FedAvg's: the personal pass never touches the global model.
    ditto = _run(tiny_scenario, "personalization.method=ditto", "personalization.lam=1e12")
    assert np.array_equal(ditto.global_vector, _run(tiny_scenario, "evaluation.federated=true").global_vector)


def test_apfl_and_finetuning_personalize_and_apfl_with_alpha_0_is_the_global_model(tiny_scenario):
    for method in ("apfl", "finetune"):
        last = _run(tiny_scenario, f"personalization.method={method}").history[-1]
        assert last["personal_accuracy_mean"] > last["personal_global_accuracy_mean"], method
    mixed_out = _run(tiny_scenario, "personalization.method=apfl", "personalization.alpha=0").history[-1]
    assert mixed_out["personal_accuracies"] == mixed_out["personal_global_accuracies"]
    untuned = _run(tiny_scenario, "personalization.method=finetune", "personalization.finetune_epochs=0").history[-1]
    assert untuned["personal_accuracies"] == untuned["personal_global_accuracies"]


def test_personal_state_survives_resume_bit_identically(tiny_scenario, tmp_path):
    overrides = ["personalization.method=ditto", "checkpoint.every=2", "secure_aggregation.threshold=0.5"]
    whole = _run(tiny_scenario, *overrides)
    copy = tmp_path / "resumed"
    shutil.copytree(whole.run_dir, copy)
    scenario = parse_and_validate(apply_overrides(tiny_scenario, [*SKEW, *overrides]))
    resumed = execute(scenario, resume=copy)  # from the checkpoint after round 2, as a run killed in round 3
    assert resumed.summary["resumed_after_round"] == 2
    assert np.array_equal(resumed.global_vector, whole.global_vector)
    # Round 4 evaluates v_k trained in rounds 1-4: equal only if rounds 1-2's personal rows were restored.
    assert resumed.history[-1]["personal_accuracies"] == whole.history[-1]["personal_accuracies"]


def test_the_privacy_report_says_personal_parameters_cost_no_budget(tiny_scenario):
    result = _run(tiny_scenario, "personalization.method=fedper", "privacy.mechanism=central", "privacy.clip_norm=1.0")
    assert "cost none" in result.summary["privacy"]["personalization"]


def test_personal_layers_name_module_prefixes():
    model = build_model(parse_and_validate({"model": {"kind": "cnn", "channels": [4]},
                                            "data": {"source": "digits"}}).model, (1, 8, 8), 10)
    assert module_names(model) == ["features.0", "head"]
    config = parse_and_validate({"personalization": {"method": "fedper", "personal_layers": ["features"]},
                                 "evaluation": {"federated": True}}).personalization
    assert personal_indices(model, config).size == 4 * 9 + 4
    with torch.no_grad():
        assert personal_indices(model, config.model_copy(update={"personal_layers": None})).size == 4 * 4 * 4 * 10 + 10


@pytest.mark.parametrize(("overrides", "field"), [
    (["personalization.method=fedper", "personalization.personal_layers=[\"decoder\"]"], "personalization.personal_layers"),
    (["personalization.method=fedper", "model.kind=logreg"], "personalization.personal_layers"),
    (["personalization.method=ditto", "personalization.lam=-1"], "personalization.lam"),
    (["personalization.method=finetune", "personalization.finetune_epochs=-1"], "personalization.finetune_epochs"),
    (["personalization.method=ditto", "personalization.personal_layers=[\"3\"]"], "personalization.personal_layers"),
    (["personalization.method=ditto", "evaluation.federated=false"], "evaluation.federated"),
    (["personalization.method=fedper", "strategy.name=scaffold"], "strategy.name"),
])
def test_bad_personalization_gets_one_line_naming_its_field(tiny_scenario, overrides, field):
    with pytest.raises(ScenarioError, match=field.replace(".", r"\.")) as caught:
        raysim.run(tiny_scenario, overrides=[*SKEW, *overrides])
    assert "\n" not in str(caught.value)
