"""The leakage lab: gradient inversion on the server's recorded view, membership inference against the DP
bound, and what the attacks may read."""

import json

import numpy as np
import pytest

import raysim
from raysim.adversary.inversion import label_accuracy, matched_error, recover_labels
from raysim.adversary.lab import LeakageView, PublicModel, dp_bound, reconstruct
from raysim.engine.attack import attack_round, membership
from raysim.cli import main
from raysim.config import scenario_to_yaml
from raysim.data.load import load_data
from raysim.engine.validation import parse_and_validate
from raysim.errors import ScenarioError

pytestmark = pytest.mark.usefixtures("ray_session")

PLAIN_PSNR, SECURE_PSNR = 30.0, 12.0  # dB: DLG must beat the first on one client's update, and stay under the second


@pytest.fixture(scope="module")
def digits_clients():
    """Digits with one training sample per client: each client's round is one SGD step on one sample."""
    scenario = parse_and_validate({"data": {"source": "digits"}})
    return len(load_data(scenario).y_train)


def _one_sample_run(tmp_path, clients: int, *overrides: str) -> raysim.Result:
    raw = {"name": "leak", "seed": 1, "num_clients": clients, "rounds": 1,
           "data": {"source": "digits"}, "partition": {"kind": "iid"}, "sampling": {"clients_per_round": 10},
           "model": {"kind": "mlp", "hidden": [32]}, "training": {"epochs": 1, "batch_size": 1, "lr": 0.1},
           "executor": {"num_workers": 2, "clients_per_call": 1}, "leakage": {"rounds": [1]},
           "tracking": {"progress": False}, "output": {"dir": str(tmp_path)}}
    return raysim.run(raw, overrides=list(overrides))


def test_idlg_reconstructs_one_client_s_sample_and_fails_on_the_secure_sum_of_10(tmp_path, digits_clients):
    plain = _one_sample_run(tmp_path / "plain", digits_clients)
    attacked = attack_round(plain.run_dir, 1, "idlg")
    assert attacked["view"] == "updates" and attacked["sum_of_clients"] == 1
    assert attacked["psnr"] > PLAIN_PSNR and attacked["label_accuracy"] == 1.0
    assert (plain.run_dir / "leakage" / "round_1_idlg.png").exists()  # the picture grid
    secure = _one_sample_run(tmp_path / "secure", digits_clients, "secure_aggregation.threshold=0.5")
    hidden = attack_round(secure.run_dir, 1, "idlg")
    assert hidden["view"] == "secure_sum" and hidden["sum_of_clients"] == 10
    assert hidden["psnr"] < SECURE_PSNR


def test_the_attack_reads_the_server_s_view_and_nothing_else(tmp_path, digits_clients):
    run = _one_sample_run(tmp_path, digits_clients, "secure_aggregation.threshold=0.5")
    view = LeakageView.load(run.run_dir, 1)
    # The view holds what the secure round released to the server: one sum, its weight, the survivors.
    assert view.kind == "secure_sum" and view.sums.shape == (1, view.global_vec.size)
    assert view.client_ids.size == 10 and list(view.offsets) == [0, 10]
    scenario = parse_and_validate(json.loads(json.dumps(_config(run))))
    public = PublicModel(scenario.model, (1, 8, 8), 10, scenario.training.lr)
    found = reconstruct(view, public, 0, 1, "idlg", iterations=50, box=(0.0, 1.0))  # no data in, a batch out
    assert found.x.shape == (1, 1, 8, 8)


def _config(run: raysim.Result) -> dict:
    import yaml

    return yaml.safe_load((run.run_dir / "config.yaml").read_text())


def test_label_recovery_and_matching_metrics():
    assert recover_labels(np.array([0.3, -0.9, 0.1, 0.2]), 1).tolist() == [1]
    assert recover_labels(np.array([0.3, -0.9, -0.1, 0.2]), 2).tolist() == [1, 2]
    assert recover_labels(np.array([-0.6, -0.3, 0.5]), 6).tolist() == [0, 0, 0, 0, 1, 1]  # more samples than classes
    true = np.arange(12, dtype=float).reshape(3, 4)
    assert matched_error(true[::-1], true, 11.0)[0] == 0.0  # order does not matter
    assert label_accuracy(np.array([2, 1, 1]), np.array([1, 2, 3])) == pytest.approx(2 / 3)


def test_membership_inference_finds_a_memorizing_model_and_stays_under_the_dp_bound(tmp_path):
    # 800 training samples of 64 features over 5 clients, every client every round, 200 epochs in all: memorized.
    small = {"name": "mi", "seed": 0, "num_clients": 5, "rounds": 10, "partition": {"kind": "iid"},
             "data": {"source": "synthetic", "num_samples": 1000, "num_features": 64, "num_classes": 10, "test_fraction": 0.8},
             "sampling": {"clients_per_round": 5}, "model": {"kind": "mlp", "hidden": [256]},
             "training": {"epochs": 20, "batch_size": 8, "lr": 0.1, "vectorize": True},  # the same model, to 1e-7, faster
             "executor": {"num_workers": 2, "clients_per_call": 5}, "tracking": {"progress": False}}
    memorized = raysim.run({**small, "output": {"dir": str(tmp_path / "a")}})
    found = membership(memorized.run_dir)
    assert found["auc"] > 0.75 and found["epsilon"] is None  # measured 0.87
    both = membership(memorized.run_dir, shadows=4)  # four OUT models trained by the simulator
    assert both["lira"]["auc"] > 0.75
    # LiRA's edge is at low FPR: on the same targets it finds more members at 1% FPR than the threshold does.
    assert both["lira"]["tpr_at_1pct_fpr"] > both["tpr_at_1pct_fpr"]  # measured 0.110 against 0.080
    private = raysim.run({**small, "name": "mi_dp", "output": {"dir": str(tmp_path / "b")},
                          "privacy": {"mechanism": "central", "noise_multiplier": 10.0, "clip_norm": 0.5}})
    bounded = membership(private.run_dir, shadows=4)
    assert bounded["epsilon"] < 1.5  # q = 1, z = 10, 10 rounds: 1.31
    assert bounded["significant_excess"] <= 0.0  # no point above e^ε·FPR + δ beyond sampling error
    assert bounded["lira"]["significant_excess"] <= 0.0
    assert bounded["auc"] < found["auc"]


def test_the_dp_bound_is_the_hypothesis_testing_region():
    fpr = np.array([0.0, 0.1, 0.5, 1.0])
    np.testing.assert_allclose(dp_bound(fpr, 0.0, 0.0), fpr, atol=1e-15)  # ε = 0: no test beats chance
    assert dp_bound(np.array([0.1]), 1.0, 1e-5)[0] == pytest.approx(min(np.e * 0.1 + 1e-5, 1 - np.exp(-1) * (0.9 - 1e-5)))


def test_a_round_not_recorded_and_a_text_run_get_one_line(tmp_path, digits_clients, capsys):
    run = _one_sample_run(tmp_path, digits_clients)
    assert main(["attack", str(run.run_dir), "--round", "7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raysim: error: --round: round 7 was not recorded") and "\n" not in err
    with pytest.raises(ScenarioError, match="leakage"):
        parse_and_validate({"data": {"source": "shakespeare_lm"}, "model": {"kind": "hf_causal_lm"},
                            "leakage": {"rounds": [1]}})
    text = tmp_path / "text_run"
    text.mkdir()
    text.joinpath("config.yaml").write_text(scenario_to_yaml(parse_and_validate(
        {"data": {"source": "shakespeare_lm"}, "model": {"kind": "hf_causal_lm"}})))
    assert main(["attack", str(text)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raysim: error: attack: gradient inversion is built for") and "\n" not in err
