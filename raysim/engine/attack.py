"""``raysim attack``: the leakage lab's attacks on a run folder, in the driver (``raysim.adversary.lab``).

``attack_round`` inverts a victim's update from the server's recorded view of a round (``LeakageView``) and
scores the reconstruction against the victim's true samples, which only the scorer reads. ``membership``
runs the loss-threshold membership-inference attack on the final model, members being the training samples
of clients that took part in a round and non-members the held-out test set, and holds its ROC to the run's
(ε, δ) bound. Both write their results next to the view, in ``<run>/leakage/``.
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


def membership(run_dir: Path, max_samples: int = 2000) -> dict[str, Any]:
    """The loss-threshold attack on ``run_dir``'s final model; writes ``leakage/membership.json`` and its ROC
    plot against the DP bound when the run reported an ε."""
    import torch

    from raysim.client.train import client_rng
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
    non_members = rng.permutation(len(dataset.y_test))[:max_samples]
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
    write_atomic(out, (json.dumps(result, indent=1) + "\n").encode())
    roc_plot(fpr, tpr, epsilon, delta, out.with_suffix(".png"))
    return result
