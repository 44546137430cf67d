"""The server's half of differential privacy: what it adds, what it steps, and what it reports.

``CentralDP`` serves user-level DP-FedAvg (McMahan et al. 2018) and distributed DP: the aggregate of
clipped, weighted deltas is divided by the fixed denominator qW; in the central mechanism the server
adds N(0, σ²) with σ = z·S/(qW), in the distributed one the noise already arrived inside the secure sum.
Either way the accountant steps once per round with (z, q), adaptive clipping (Andrew et al. 2021)
moves C, and a budget can stop or warn. The accountant's q is the worst-case participation rate and
the denominator's q the expected kept fraction (``raysim.privacy.dp.sampling`` says why).

A round in which no update reaches the sum still runs the mechanism as Algorithm 1 of McMahan et al.
defines it: the central server releases 0/(qW) + N(0, σ²), steps the strategy, the accountant and the
adaptive clip (with a zero count). Under distributed DP the noise comes from the clients, so a round
that released nothing (no client sampled, or secure aggregation aborted) leaves the model unchanged;
its accountant is stepped all the same (conservatively: nothing data-dependent left the clients'
protocol, but ε then stays the planned function of the rounds run), and the round is counted.

``LocalDPLedger`` keeps each client's DP-SGD accountant state, so clients sampled again continue their
own accounting, and reports the max and mean ε over clients.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from raysim.config import PrivacyConfig
from raysim.privacy.dp.accountant import BudgetCheck, PrivacyAccountant, check_budget, noise_for_target_epsilon
from raysim.privacy.dp.adaptive import AdaptiveClipping
from raysim.privacy.dp.central import dp_fedavg_aggregate, noise_stddev

EMPTY_ROUNDS = {
    "central": "the server released 0/(qW) + N(0, σ²), stepped the model and the accountant",
    "distributed": "nothing was released and the model kept; the accountant was stepped all the same (conservative)",
}


class CentralDP:
    """DP-FedAvg's server state: the accountant (q = ``sample_rate``), qW (``denominator_rate``·W), the clip.

    ``blocks``: how many vectors each client releases under the one mechanism, each clipped to its own
    bound (2 for DP-SCAFFOLD's Δy and Δc). Their concatenation, each block divided by its clip, has
    sensitivity √blocks, so every block's noise is √blocks·z times its clip and the accountant steps with z.
    """

    def __init__(self, config: PrivacyConfig, *, sample_rate: float, rounds: int, total_weight: float,
                 expected_cohort: float, denominator_rate: float | None = None, blocks: int = 1) -> None:
        self.config, self.sample_rate, self.blocks = config, sample_rate, blocks
        self.denominator_rate = sample_rate if denominator_rate is None else denominator_rate
        self.expected_weight = self.denominator_rate * total_weight  # qW, the fixed denominator
        self.expected_cohort = expected_cohort
        self.noise_multiplier = (
            noise_for_target_epsilon(config.target_epsilon, sample_rate, rounds, config.delta, config.accountant)
            if config.target_epsilon is not None else config.noise_multiplier
        )
        self.accountant = PrivacyAccountant(config.accountant, config.delta)
        self.adaptive = None
        if config.adaptive is not None:
            self.adaptive = AdaptiveClipping.for_cohort(
                initial_clip_norm=config.clip_norm, noise_multiplier=self.noise_multiplier,
                expected_cohort_size=expected_cohort, target_quantile=config.adaptive.target_quantile,
                learning_rate=config.adaptive.learning_rate, count_stddev=config.adaptive.count_stddev)
        self.budget = config.budget_epsilon or config.target_epsilon
        self.empty_rounds = 0

    @property
    def clip_norm(self) -> float:
        """The clip S (or the current adaptive C) that clients apply this round."""
        return self.adaptive.clip_norm if self.adaptive is not None else self.config.clip_norm

    @property
    def update_noise_multiplier(self) -> float:
        """z for the update; with adaptive clipping part of the budget goes to the count (z_Δ)."""
        return self.adaptive.update_noise_multiplier if self.adaptive is not None else self.noise_multiplier

    @property
    def block_noise_multiplier(self) -> float:
        """The noise of each released block, in units of its clip: √blocks·z_Δ."""
        return math.sqrt(self.blocks) * self.update_noise_multiplier

    def budget_check(self) -> BudgetCheck | None:
        """Whether one more round stays within the budget (None when there is no budget)."""
        if self.budget is None or self.noise_multiplier == 0:
            return None
        # A target solved by Opacus's search may sit a hair above the budget after the last round.
        check = check_budget(self.accountant, target_epsilon=self.budget * (1 + 1e-6),
                             noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return check

    def aggregate(self, weighted_sum: np.ndarray, *, unclipped: int, rng: np.random.Generator,
                  server_noise: bool, empty: bool = False) -> np.ndarray:
        """The privatized mean delta for one round; steps the accountant and the adaptive clip.

        ``empty``: no update reached ``weighted_sum`` (it is zero), which the mechanism releases all the same.
        """
        clip = self.clip_norm
        z = self.block_noise_multiplier if server_noise else 0.0
        mean = dp_fedavg_aggregate(weighted_sum, expected_total_weight=self.expected_weight, clip_norm=clip,
                                   noise_multiplier=z, rng=rng)
        self.account(empty=empty)
        if self.adaptive is not None:
            self.adaptive.step(unclipped_count=unclipped, cohort_size=self.expected_cohort, rng=rng)
        return mean.astype(np.float32)

    def noise_sum(self, total: np.ndarray, clip_norm: float, rng: np.random.Generator) -> np.ndarray:
        """A further block's sum (DP-SCAFFOLD's Σ Δc_i, each clipped to ``clip_norm``) plus N(0, (√blocks·z·clip)²)."""
        sigma = self.block_noise_multiplier * clip_norm
        return total + rng.standard_normal(total.shape) * sigma if sigma > 0 else total

    def account(self, *, empty: bool) -> None:
        """Step the accountant for one round with (z, q); ``empty`` counts a round that aggregated no update."""
        self.accountant.step(self.noise_multiplier, self.sample_rate)
        self.empty_rounds += int(empty)

    def metrics(self) -> dict[str, float]:
        return {"epsilon": self.accountant.epsilon(), "dp_noise_multiplier": self.noise_multiplier,
                "dp_clip_norm": self.clip_norm,
                "dp_noise_stddev": noise_stddev(clip_norm=self.clip_norm, noise_multiplier=self.block_noise_multiplier,
                                                expected_total_weight=self.expected_weight)}

    def report(self, mechanism: str, rounds: int, sampling: str, assumption: str) -> dict[str, Any]:
        """The ``privacy`` block of summary.json; ``assumption`` is ``sampling.sampling_assumption``'s sentence."""
        return {
            "mechanism": {"central": "user-level DP-FedAvg (Gaussian, fixed denominator)",
                          "distributed": "distributed DP: client-side discrete noise under secure aggregation"}[mechanism],
            "clip_norm": self.clip_norm, "adaptive_clipping": self.adaptive is not None,
            "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
            "denominator_rate": self.denominator_rate, "rounds": rounds,
            "accountant": self.config.accountant, "delta": self.config.delta,
            "epsilon": self.accountant.epsilon(), "sampling": sampling, "sampling_assumption": assumption,
            "empty_rounds": self.empty_rounds, "empty_round_accounting": EMPTY_ROUNDS[mechanism],
            **({} if self.blocks == 1 else {
                "noised_blocks": "Δy and SCAFFOLD's Δc, each clipped (clip_norm, control_clip_norm) and noised at "
                                 f"√2·z = {self.block_noise_multiplier:.4g} times its clip, accounted as one "
                                 "mechanism at z", "control_clip_norm": self.config.control_clip_norm or self.config.clip_norm}),
        }


class LocalDPLedger:
    """Per-client DP-SGD accountant states, sent with each client's task and returned updated."""

    def __init__(self, config: PrivacyConfig) -> None:
        self.config = config
        self.states: dict[int, dict[str, Any]] = {}
        self.epsilons: dict[int, float] = {}

    def states_for(self, client_ids: np.ndarray) -> list[dict[str, Any] | None]:
        return [self.states.get(int(cid)) for cid in client_ids]

    def record(self, client_ids: np.ndarray, states: list[dict[str, Any] | None], epsilons: np.ndarray) -> None:
        for cid, state, eps in zip(client_ids.tolist(), states, epsilons.tolist()):
            if state is not None:
                self.states[cid], self.epsilons[cid] = state, eps

    def metrics(self) -> dict[str, float]:
        values = np.fromiter(self.epsilons.values(), dtype=np.float64)
        if not values.size:
            return {}
        return {"epsilon": float(values.max()), "epsilon_max": float(values.max()),
                "epsilon_mean": float(values.mean()), "dp_clients_accounted": int(values.size)}

    def report(self, rounds: int, assumption: str) -> dict[str, Any]:
        """The ``privacy`` block of summary.json; ``assumption`` is ``sampling.sampling_assumption``'s sentence."""
        metrics = self.metrics()
        return {"mechanism": "local DP-SGD (Opacus), sample-level, one accountant per client",
                "clip_norm": self.config.clip_norm, "noise_multiplier": self.config.noise_multiplier,
                "target_epsilon": self.config.target_epsilon,
                "sample_rate": "per client: 1 / ceil(samples / batch_size)", "rounds": rounds,
                "accountant": self.config.accountant, "delta": self.config.delta,
                "epsilon": metrics.get("epsilon_max", 0.0), "epsilon_mean": metrics.get("epsilon_mean", 0.0),
                "clients_accounted": metrics.get("dp_clients_accounted", 0), "sampling_assumption": assumption}


def effective_distributed_z(noise_multiplier: float, survivors: int, threshold: int) -> float:
    """z actually carried by the sum: each of ≥ t clients adds variance σ²/t, so z·√(survivors/t)."""
    return noise_multiplier * math.sqrt(survivors / threshold) if threshold else 0.0
