"""Which client-sampling rate each part of DP-FedAvg uses, and what the reported ε assumes about sampling.

The accountants (Opacus's RDP and PRV) analyse the Poisson-subsampled Gaussian mechanism (Mironov,
Talwar, Zhang 2019; Gopi, Lee, Wutschitz 2021), stepped with q = ``Scenario.sample_rate``: the largest
probability that a client's update is aggregated in a round. With over-selection (FedScale, Lai et
al. 2022) that is ⌈K·over_selection⌉/N, not K/N, because a client that always finishes first is kept
whenever it is drawn. DP-FedAvg's fixed denominator qW (McMahan et al. 2018) is a utility choice, not
a privacy one (any public constant keeps the sensitivity at S/(qW)); it uses the expected fraction of
clients *kept*, K/N, so that the estimator stays about unbiased. The texts here go into summary.json's
privacy block, the W&B summary and the progress bar's ε* note. This module imports no accountant.
"""

from __future__ import annotations

from raysim.config import Scenario, oversample_count


def denominator_rate(scenario: Scenario) -> float:
    """q of the fixed denominator qW: the Poisson rate, or K/N (with or without over-selection; in async
    modes K is a server step's updates)."""
    if scenario.asynchronous is not None:
        return scenario.sample_rate
    if scenario.sampling.kind == "poisson":
        return float(scenario.sampling.rate)
    return scenario.sampling.clients_per_round / scenario.num_clients


def sampling_assumption(scenario: Scenario) -> str:
    """What the run's ε assumes about sampling, in one sentence (``privacy`` scenarios only)."""
    privacy, n = scenario.privacy, scenario.num_clients
    if privacy.mechanism == "local":
        return ("sample-level DP-SGD: each client's accountant assumes Poisson batches at rate 1/⌈samples/batch_size⌉, "
                "which Opacus's Poisson loader draws exactly; client sampling is not used for amplification")
    q = scenario.sample_rate
    if scenario.asynchronous is not None:
        k = scenario.asynchronous.step_updates
        return (f"the accountant assumes Poisson sampling at q = K/N = {k}/{n} = {q:g} per server step; an async "
                f"buffer is not a Poisson sample: its K updates are the first K to arrive on the virtual clock from "
                f"clients launched uniformly at random, so a fast client arrives more often than q, and each client "
                f"counts at most once a step (a second update in the same buffer is dropped)")
    if scenario.sampling.kind == "poisson":
        return f"Poisson sampling of clients at rate q = {q:g}, as the accountant assumes"
    k = scenario.sampling.clients_per_round
    if scenario.over_selected:
        drawn = oversample_count(k, scenario.system.over_selection, n)
        return (f"the accountant assumes Poisson sampling at the worst-case participation rate "
                f"q = ⌈K·over_selection⌉/N = {drawn}/{n} = {q:g}: over-selection draws {drawn} clients and keeps the "
                f"first K = {k} finishers, so a fast client takes part whenever it is drawn; this run sampled a fixed "
                f"number of clients (the fixed denominator uses K/N = {k / n:g})")
    return (f"the accountant assumes Poisson sampling at q = K/N = {k}/{n} = {q:g}; "
            "this run sampled a fixed number of clients")


def epsilon_caveat(scenario: Scenario) -> str | None:
    """The note that goes with a starred ε (``ε*``), or None when the sampling is what the accountant assumes."""
    if scenario.privacy is None or scenario.privacy.mechanism == "local":
        return None
    if scenario.sampling.kind == "poisson" and scenario.asynchronous is None:
        return None
    return sampling_assumption(scenario)
