"""``raysim attack``: the leakage lab's attacks on a run folder, in the driver (``raysim.adversary.lab``).

``attack_round`` inverts a victim's update from the server's recorded view of a round (``LeakageView``) and
scores the reconstruction against the victim's true samples, which only the scorer reads. ``membership``
runs the loss-threshold membership-inference attack on the final model, members being the training samples
of clients that took part in a round and non-members the held-out test set, and, with shadow models the
simulator trains (``lira_scores``), the offline LiRA-style attack; it holds both ROCs to the run's (ε, δ)
bound. Both write their results next to the view, in ``<run>/leakage/``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from raysim.adversary.lab import (VIEW_DIR, LeakageView, Membership, PublicModel, victim_of, dp_bound, loss_threshold,
                                  picture_grid, reconstruct, roc_plot, significant_excess)
from raysim.atomic import write_atomic
from raysim.config import Scenario
from raysim.data.load import load_data, partition_data
from raysim.engine.sampling import sample_clients
from raysim.engine.validation import load_and_validate
from raysim.errors import ScenarioError

TEXT_SOURCES = ("shakespeare_lm", "shakespeare_genre", "text")


def attack_round(run_dir: Path, round_number: int, method: str = "idlg", client: int | None = None,
                 iterations: int = 300, max_samples: int = 64) -> dict[str, Any]:
    """Invert the victim's update from the server's view of ``round_number`` (``reconstruct``), then score it
    against the victim's true samples; write the results (and, for 8×8 or image samples, a picture grid) next
    to the view."""
    from raysim.adversary.inversion import label_accuracy, matched_error, matched_order

    scenario: Scenario = load_and_validate(Path(run_dir) / "config.yaml")
    if scenario.model.is_language_model or scenario.data.source in TEXT_SOURCES:
        raise ScenarioError(f"attack: gradient inversion is built for classification of numeric or image samples, "
                            f"not {scenario.data.source}'s tokens; attack a numeric or image scenario")
    view = LeakageView.load(run_dir, round_number)
    index, victim = victim_of(view, client)
    dataset = load_data(scenario)  # the ground truth, for the score only
    part = partition_data(scenario, dataset)
    own = part.indices[part.offsets[victim] : part.offsets[victim + 1]][:max_samples]
    true_x, true_y = dataset.x_train[own], dataset.y_train[own]
    low, high = float(dataset.x_train.min()), float(dataset.x_train.max())
    public = PublicModel(scenario.model, tuple(dataset.feature_shape), dataset.num_classes, scenario.training.lr)
    found = reconstruct(view, public, index, len(own), method, iterations, scenario.seed, (low, high))
    mse, psnr = matched_error(found.x, true_x, high - low)
    result = {"round": round_number, "view": view.kind, "attack": method, "victim": victim,
              "sum_of_clients": int(view.offsets[index + 1] - view.offsets[index]), "samples": int(len(own)),
              "mse": mse, "psnr": psnr, "label_accuracy": label_accuracy(found.labels, true_y)}
    out = Path(run_dir) / VIEW_DIR / f"round_{round_number}_{method}.json"
    write_atomic(out, (json.dumps(result, indent=1) + "\n").encode())
    if int(np.prod(dataset.feature_shape)) == 64 or len(dataset.feature_shape) == 3:
        picture_grid([(f"{view.kind} ({method})", true_x, matched_order(found.x, true_x))], out.with_suffix(".png"))
    return result


def membership(run_dir: Path, max_samples: int = 2000, shadows: int = 0) -> dict[str, Any]:
    """The loss-threshold attack on ``run_dir``'s final model; writes ``leakage/membership.json`` and its ROC
    plot against the DP bound when the run reported an ε. With ``shadows`` K > 0 also the offline LiRA-style
    attack (``lira``): half of the held-out samples become the shadow pool, the other half the non-members."""
    import torch

    from raysim.client.rng import client_rng
    from raysim.models.flat import FlatParams
    from raysim.models.zoo import build_model

    run_dir = Path(run_dir)
    scenario: Scenario = load_and_validate(run_dir / "config.yaml")
    if scenario.model.is_language_model:
        raise ScenarioError("attack: membership inference is built for classifiers of numeric or image samples; "
                            "attack a numeric or image scenario")
    final = run_dir / "final_model.npy"
    if not final.exists():
        raise ScenarioError(f"--membership: {final} is missing; attack a finished run")
    dataset = load_data(scenario)
    part = partition_data(scenario, dataset)
    rounds = json.loads((run_dir / "summary.json").read_text()).get("rounds", scenario.rounds) \
        if (run_dir / "summary.json").exists() else scenario.rounds
    seen = np.unique(np.concatenate([sample_clients(scenario.sampling, scenario.num_clients, scenario.seed, r)
                                     for r in range(rounds)]))
    members = np.concatenate([part.indices[part.offsets[c] : part.offsets[c + 1]] for c in seen])
    rng = client_rng(scenario.seed, 0, 0, stream=21)
    members = rng.permutation(members)[:max_samples]
    held = rng.permutation(len(dataset.y_test))
    pool = held[len(held) // 2 :] if shadows else held[:0]  # the shadow models' data: never a target
    non_members = (held[: len(held) // 2] if shadows else held)[:max_samples]
    model = build_model(scenario.model, dataset.feature_shape, dataset.num_classes)
    FlatParams(model).load(np.load(final))
    model.eval()

    def losses(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y).long(),
                                                     reduction="none").numpy()

    fpr, tpr, auc = loss_threshold(losses(dataset.x_train[members], dataset.y_train[members]),
                                   losses(dataset.x_test[non_members], dataset.y_test[non_members]))
    privacy = json.loads((run_dir / "summary.json").read_text()).get("privacy") if (run_dir / "summary.json").exists() else None
    epsilon = None if not privacy else privacy.get("epsilon")
    delta = None if not privacy else privacy.get("delta")
    excess = None if epsilon is None else float(np.max(tpr - dp_bound(fpr, epsilon, delta)))
    significant = None if epsilon is None else significant_excess(fpr, tpr, len(members), len(non_members), epsilon, delta)
    outcome = Membership(auc=auc, tpr_at_1pct_fpr=float(np.max(tpr[fpr <= 0.01], initial=0.0)), epsilon=epsilon,
                         delta=delta, worst_excess=excess, significant_excess=significant, members=len(members),
                         non_members=len(non_members))
    out = run_dir / VIEW_DIR / "membership.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), 400)).astype(int))  # the ROC, thinned for the file
    result = {**asdict(outcome), "roc_fpr": fpr[keep].tolist(), "roc_tpr": tpr[keep].tolist()}
    if shadows:
        targets_x = np.concatenate([dataset.x_train[members], dataset.x_test[non_members]])
        targets_y = np.concatenate([dataset.y_train[members], dataset.y_test[non_members]])
        scores = lira_scores(model, scenario, targets_x, targets_y, dataset.x_test[pool], dataset.y_test[pool],
                             shadows, len(members), dataset.num_classes)
        lira_fpr, lira_tpr, lira_auc = loss_threshold(-scores[: len(members)], -scores[len(members) :])
        result["lira"] = {"shadows": shadows, "auc": lira_auc,
                          "tpr_at_1pct_fpr": float(np.max(lira_tpr[lira_fpr <= 0.01], initial=0.0)),
                          "significant_excess": None if epsilon is None else significant_excess(
                              lira_fpr, lira_tpr, len(members), len(non_members), epsilon, delta)}
    write_atomic(out, (json.dumps(result, indent=1) + "\n").encode())
    roc_plot(fpr, tpr, epsilon, delta, out.with_suffix(".png"))
    return result


def lira_scores(model: Any, scenario: Scenario, x: np.ndarray, y: np.ndarray, pool_x: np.ndarray, pool_y: np.ndarray,
                shadows: int, size: int, num_classes: int) -> np.ndarray:
    """Offline LiRA (Carlini et al., S&P 2022): train ``shadows`` OUT models with the simulator itself (the same
    scenario, another seed, ``size`` samples drawn from the shadow pool, which holds no target) and score each
    target by how far its logit-scaled confidence under the attacked ``model`` stands above the shadows'
    (a z-score with a global standard deviation, as the paper advises for few shadows)."""
    import tempfile

    import torch
    import yaml

    import raysim
    from raysim.config import scenario_to_yaml
    from raysim.models.flat import FlatParams
    from raysim.models.zoo import build_model

    def confidence(net: Any) -> np.ndarray:  # log p_y − log(1 − p_y), computed stably
        with torch.no_grad():
            logits = net(torch.from_numpy(x)).double()
            own = logits.gather(1, torch.from_numpy(y).long()[:, None])[:, 0]
            others = logits.scatter(1, torch.from_numpy(y).long()[:, None], float("-inf"))
            return (own - torch.logsumexp(others, dim=1)).numpy()

    rng = np.random.default_rng([scenario.seed, 23])
    raw = yaml.safe_load(scenario_to_yaml(scenario))
    out = []
    with tempfile.TemporaryDirectory() as folder:
        for k in range(shadows):
            chosen = rng.choice(len(pool_y), size=min(size, len(pool_y)), replace=False)
            top = np.flatnonzero(pool_y == num_classes - 1)
            if top.size and not (pool_y[chosen] == num_classes - 1).any():  # an npz's classes are 0..max label
                chosen[-1] = top[0]
            path = Path(folder) / f"shadow_{k}.npz"
            np.savez(path, x=pool_x[chosen], y=pool_y[chosen])
            shadow = {**raw, "name": f"shadow_{k}", "seed": scenario.seed + 1 + k, "leakage": None,
                      "data": {"source": "npz", "path": str(path), "test_fraction": 0.1},
                      "tracking": {"wandb": "disabled", "progress": False}, "output": {"dir": folder}}
            trained = raysim.run(shadow)
            net = build_model(scenario.model, tuple(x.shape[1:]), num_classes)
            FlatParams(net).load(trained.global_vector)
            net.eval()
            out.append(confidence(net))
    shadow_conf = np.stack(out)
    spread = float(np.sqrt(np.mean(np.var(shadow_conf, axis=0)))) or 1.0
    return (confidence(model) - shadow_conf.mean(axis=0)) / spread
