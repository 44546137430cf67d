"""The leakage lab: attacks on exactly what the server saw, read back from a run folder (``raysim attack``).

A scenario's ``leakage: {rounds: [...]}`` makes the server actor write, for each listed round, its view
of the round to ``<run>/leakage/round_<r>.npz`` (``LeakageView``): the global model the round started
from and what reached it or what it released, by defence:

* ``updates`` (plain FedAvg, local DP-SGD, robust rules): each chunk's weighted sum of updates, its weight,
  its clients and their local steps; with ``executor.clients_per_call: 1`` a chunk is one client's update;
* ``secure_sum``: the survivors' sum that secure aggregation released, and who survived;
* ``noised_aggregate`` (central and distributed DP): the noised mean update the server steps with.

``reconstruct`` runs gradient inversion (``raysim.adversary.inversion``) on that view alone; ``loss_threshold``
is the membership-inference attack of Yeom et al. (CSF 2018), and ``dp_bound`` and ``significant_excess``
hold its ROC to the bound an (ε, δ)-DP mechanism allows. ``raysim.engine.attack`` runs them on a run folder
(``raysim attack``), scoring against the ground truth that only the scorer reads.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from raysim.atomic import write_atomic
from raysim.errors import ScenarioError

VIEW_DIR = "leakage"


@dataclass
class LeakageView:
    """One round as the server saw it."""

    round: int  # 1-based
    kind: str  # "updates", "secure_sum" or "noised_aggregate"
    global_vec: np.ndarray  # the model the round's clients started from
    sums: np.ndarray  # (views, d): each chunk's Σ w·Δ, or the one released sum
    weights: np.ndarray  # (views,): Σ w of each sum (the expected weight under DP)
    client_ids: np.ndarray  # every client behind the sums, in order
    offsets: np.ndarray  # (views + 1,): client_ids[offsets[k]:offsets[k + 1]] are sum k's clients
    steps: np.ndarray  # local steps of each of client_ids

    def save(self, run_dir: Path) -> Path:
        import io

        path = Path(run_dir) / VIEW_DIR / f"round_{self.round}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **{f.name: np.asarray(getattr(self, f.name)) for f in fields(self)})
        write_atomic(path, buffer.getvalue())
        return path

    @classmethod
    def load(cls, run_dir: Path, round_number: int) -> LeakageView:
        path = Path(run_dir) / VIEW_DIR / f"round_{round_number}.npz"
        if not path.exists():
            recorded = sorted(int(p.stem.split("_")[1]) for p in path.parent.glob("round_*.npz")) \
                if path.parent.is_dir() else []
            raise ScenarioError(f"--round: round {round_number} was not recorded in {path.parent} (recorded: "
                                f"{recorded or 'none'}); add it to the scenario's leakage.rounds and run it again")
        with np.load(path) as data:
            values = {f.name: data[f.name] for f in fields(cls)}
        values["round"], values["kind"] = int(values["round"]), str(values["kind"])
        return cls(**values)


def view_of_round(round_number: int, global_vec: np.ndarray, reduction: Any, secure: Any, released: Any) -> LeakageView:
    """The server's view of a finished round (``reduction``: the chunks; ``secure``: the secure release;
    ``released``: what the server halves made of them)."""
    ids, steps = reduction.client_ids, np.concatenate([c.steps for c in reduction.chunks]) if reduction.chunks else []
    if secure is not None:
        survivors = np.asarray(secure.survivors, dtype=np.int64)
        total = np.zeros_like(global_vec, dtype=np.float64) if secure.weighted_sum is None else secure.weighted_sum
        weight = 0.0 if secure.weight is None else secure.weight
        if released.mean is not None:  # DP on top: the noised mean is the release
            total, weight = released.mean, 1.0
        return LeakageView(round_number, "secure_sum", global_vec, np.asarray(total)[None], np.array([weight]),
                           survivors, np.array([0, survivors.size]), _steps_of(survivors, ids, steps))
    if reduction.rows is not None:  # a robust rule's individual updates: one view per client
        return LeakageView(round_number, "updates", global_vec, np.asarray(reduction.rows, dtype=np.float64),
                           np.ones(len(ids)), ids, np.arange(len(ids) + 1), np.asarray(steps))
    if released.mean is not None:  # central DP's noised aggregate (DP's server half set the mean)
        kept = ids[released.included]
        return LeakageView(round_number, "noised_aggregate", global_vec, np.asarray(released.mean)[None],
                           np.array([1.0]), kept, np.array([0, kept.size]), _steps_of(kept, ids, steps))
    sums = np.stack([c.delta_sum for c in reduction.chunks])
    offsets = np.cumsum([0, *(len(c.client_ids) for c in reduction.chunks)])
    return LeakageView(round_number, "updates", global_vec, sums, np.array([c.weight_sum for c in reduction.chunks]),
                       ids, offsets, np.asarray(steps))


def _steps_of(chosen: np.ndarray, ids: np.ndarray, steps: Any) -> np.ndarray:
    lookup = dict(zip(np.asarray(ids).tolist(), np.asarray(steps).tolist()))
    return np.array([lookup.get(int(u), 0) for u in chosen], dtype=np.int64)


def victim_of(view: LeakageView, client: int | None) -> tuple[int, int]:
    """(the sum to attack, the victim client): the sum holding ``client``, or the first single-client sum."""
    for k in range(len(view.sums)):
        members = view.client_ids[view.offsets[k] : view.offsets[k + 1]].tolist()
        if (client is None and (len(members) == 1 or view.kind != "updates")) or client in members:
            return k, members[0] if client is None else client
    if client is not None:
        raise ScenarioError(f"--client: client {client} is not behind any sum the server saw in round {view.round}; "
                            f"use one of {view.client_ids.tolist()[:20]}")
    return 0, int(view.client_ids[0])


@dataclass(frozen=True)
class PublicModel:
    """What the server knows besides the messages: the model's architecture, the sample shape, the classes, and
    the clients' local learning rate."""

    config: Any  # ModelConfig
    sample_shape: tuple[int, ...]
    num_classes: int
    lr: float


def reconstruct(view: LeakageView, public: PublicModel, victim_sum: int, samples: int, method: str = "idlg",
                iterations: int = 300, seed: int = 0, box: tuple[float, float] = (-3.0, 3.0)):
    """Gradient inversion from the server's view alone: the sum ``victim_sum`` as a pseudo-gradient of ``samples``
    samples, at the model the round started from. Reads nothing but its arguments."""
    from raysim.adversary.inversion import invert, pseudo_gradient
    from raysim.models.zoo import build_model

    members = view.client_ids[view.offsets[victim_sum] : view.offsets[victim_sum + 1]]
    steps = float(np.mean(view.steps[view.offsets[victim_sum] : view.offsets[victim_sum + 1]])) if members.size else 1.0
    weight = float(view.weights[victim_sum]) or 1.0
    target = pseudo_gradient(view.sums[victim_sum] / weight, public.lr, steps)
    model = build_model(public.config, public.sample_shape, public.num_classes)
    found = invert(model, view.global_vec, target, public.sample_shape, samples, public.num_classes, method=method,
                   iterations=iterations, seed=seed, box=box)
    found.x = np.clip(found.x, *box)
    return found


def picture_grid(rows: list[tuple[str, np.ndarray, np.ndarray]], path: Path, columns: int = 8) -> Path:
    """True samples beside their reconstructions, one pair of rows per defence (8×8 digits or C×H×W images)."""
    import io

    from matplotlib.figure import Figure

    fig = Figure(figsize=(columns * 0.9, 2.0 * len(rows) + 0.4), layout="constrained")
    axes = fig.subplots(2 * len(rows), columns, squeeze=False)
    for r, (label, true, recon) in enumerate(rows):
        for c in range(columns):
            for k, images in enumerate((true, recon)):
                ax = axes[2 * r + k][c]
                ax.set_xticks([]), ax.set_yticks([])
                if c < len(images):
                    image = images[c].reshape(-1, 8, 8)[0] if images[c].size == 64 else images[c][0]
                    ax.imshow(image, cmap="gray")
            axes[2 * r][0].set_ylabel("true", fontsize=7)
            axes[2 * r + 1][0].set_ylabel(label, fontsize=7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    write_atomic(path, buffer.getvalue())
    return path


@dataclass
class Membership:
    """The loss-threshold attack's outcome and the DP bound it is held to."""

    auc: float
    tpr_at_1pct_fpr: float
    epsilon: float | None
    delta: float | None
    worst_excess: float | None  # max over thresholds of TPR − bound(FPR), as measured
    significant_excess: float | None  # the same with Clopper-Pearson 95% bounds: > 0 is a bug in the DP or its ε
    members: int
    non_members: int


def dp_bound(fpr: np.ndarray, epsilon: float, delta: float) -> np.ndarray:
    """The largest TPR an (ε, δ)-DP mechanism allows at each FPR (Kairouz et al. 2015's hypothesis-testing
    region): min(e^ε·FPR + δ, 1 − e^−ε·(1 − δ − FPR))."""
    fpr = np.asarray(fpr, dtype=np.float64)
    return np.clip(np.minimum(np.exp(epsilon) * fpr + delta, 1 - np.exp(-epsilon) * (1 - delta - fpr)), 0.0, 1.0)


def significant_excess(fpr: np.ndarray, tpr: np.ndarray, positives: int, negatives: int, epsilon: float,
                       delta: float, confidence: float = 0.95) -> float:
    """max over the ROC's points of (a lower confidence bound on TPR) − bound(an upper confidence bound on FPR):
    above 0 only where the measured point lies above the DP bound beyond sampling error (Clopper-Pearson)."""
    from scipy.stats import beta

    a = (1 - confidence) / 2
    tp, fp = np.rint(tpr * positives), np.rint(fpr * negatives)
    tpr_low = np.where(tp > 0, beta.ppf(a, np.maximum(tp, 1), positives - tp + 1), 0.0)
    fpr_high = np.where(fp < negatives, beta.ppf(1 - a, fp + 1, np.maximum(negatives - fp, 1)), 1.0)
    return float(np.max(tpr_low - dp_bound(fpr_high, epsilon, delta)))


def loss_threshold(member_losses: np.ndarray, non_member_losses: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Yeom et al.'s attack, "a member if its loss is below τ", at every τ: (FPR, TPR, AUC)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    labels = np.r_[np.ones(len(member_losses)), np.zeros(len(non_member_losses))]
    scores = -np.r_[member_losses, non_member_losses]
    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr, tpr, float(roc_auc_score(labels, scores))


def roc_plot(fpr: np.ndarray, tpr: np.ndarray, epsilon: float | None, delta: float | None, path: Path) -> None:
    import io

    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.plot(fpr, tpr, label="loss-threshold attack")
    grid = np.linspace(0, 1, 201)
    ax.plot(grid, grid, color="grey", linestyle=":", label="chance")
    if epsilon is not None:
        ax.plot(grid, dp_bound(grid, epsilon, delta), color="red", linestyle="--", label=f"(ε={epsilon:.2g}, δ) bound")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="membership inference", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    write_atomic(path, buffer.getvalue())
