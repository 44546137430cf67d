"""The client system model: who is how fast, how well connected, when online, and who drops out.

Real devices differ in compute speed, bandwidth and availability; the simulator models
them in virtual seconds, seeded and deterministic, with no real sleeps.

Per-client draws are counter-based: a client's value is a pure function of
(seed, stream, client id), computed as the (id + 1)-th output of a SplitMix64 generator
(Steele, Lea & Flood 2014) whose state is the seed hashed with the stream's words, then
mapped to U(0, 1) and through an inverse CDF (Box–Muller for the lognormal). The hash is
vectorised over a batch of ids, so a population of 1,000,000 costs nothing until a client
is sampled, and client 42 draws the same speed alone or in a batch of 1,000.

The distributions and availability windows are the scenario's own blocks (``raysim.config.Distribution``
and ``Availability``); this module feeds their inverse CDFs with its draws. ``client_system`` builds
the model a scenario's ``system`` block describes; the clocks in ``raysim.engine.clock`` and
``raysim.engine.async_schedule`` turn it into virtual durations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raysim.client.samples import train_sizes
from raysim.config import Availability, Distribution, Scenario
from raysim.engine.trace import ClientTrace, load_trace
from raysim.errors import ScenarioError

_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_SPEED, _UP_BW, _DOWN_BW, _PHASE, _AVAILABLE, _DROPOUT = 1, 2, 3, 4, 5, 6


def _splitmix64(state: np.ndarray) -> np.ndarray:
    """SplitMix64's output for each 64-bit state (Steele et al. 2014), wrapping mod 2^64."""
    with np.errstate(over="ignore"):
        z = state + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def counter_uniforms(seed: int, client_ids: np.ndarray, *stream: int) -> np.ndarray:
    """U(0, 1) draws, one per client id, each a pure function of (seed, stream, id)."""
    key = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
    for word in stream:
        key = _splitmix64(key ^ np.uint64(word & _MASK64))
    ids = np.asarray(client_ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        bits = _splitmix64(key + ids * _GOLDEN)
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # 53 bits, never 0 or 1


class SystemModel:
    """Per-client speed, bandwidth, availability and dropout, derived lazily per batch of ids.

    A ``trace`` replaces the speed and bandwidth distributions (and, if it lists
    intervals, the on/off windows). Bandwidths left as None are unlimited.
    """

    def __init__(
        self,
        *,
        seed: int,
        speed: Distribution | None = None,
        up_bw: Distribution | None = None,
        down_bw: Distribution | None = None,
        availability: Availability = Availability(),
        dropout: float = 0.0,
        trace: ClientTrace | None = None,
    ) -> None:
        if trace is None and speed is None:
            raise ScenarioError("system.speed: required unless system.trace gives per-client speeds")
        for field, dist, unit in (("system.speed", speed, "samples/s"), ("system.up_bw", up_bw, "bytes/s"),
                                  ("system.down_bw", down_bw, "bytes/s")):
            if dist is not None:
                dist.check(field, unit)
        availability.check()
        if not 0.0 <= dropout < 1.0:
            raise ScenarioError(f"system.dropout: must be in [0, 1) (got {dropout}); it is a per-task probability")
        self.seed, self.trace, self.availability, self.dropout = int(seed), trace, availability, float(dropout)
        self._dists = {_SPEED: speed, _UP_BW: up_bw, _DOWN_BW: down_bw}

    def _quantity(self, client_ids: np.ndarray, stream: int) -> np.ndarray:
        ids = np.asarray(client_ids, dtype=np.int64)
        if self.trace is not None:
            return self.trace.column(ids, {_SPEED: "speed", _UP_BW: "up_bw", _DOWN_BW: "down_bw"}[stream])
        dist = self._dists[stream]
        if dist is None:
            return np.full(ids.shape, np.inf)
        return dist.sample(ids, lambda k: counter_uniforms(self.seed, ids, stream, k))

    def speed(self, client_ids: np.ndarray) -> np.ndarray:
        """Training samples per second."""
        return self._quantity(client_ids, _SPEED)

    def up_bw(self, client_ids: np.ndarray) -> np.ndarray:
        """Uplink bytes per second (inf: unlimited)."""
        return self._quantity(client_ids, _UP_BW)

    def down_bw(self, client_ids: np.ndarray) -> np.ndarray:
        """Downlink bytes per second (inf: unlimited)."""
        return self._quantity(client_ids, _DOWN_BW)

    def duration(
        self, client_ids: np.ndarray, num_samples: np.ndarray | int, epochs: np.ndarray | int,
        model_bytes: int, *, up_bytes: int | None = None,
    ) -> np.ndarray:
        """Virtual seconds per client: download + samples·epochs / speed + upload.

        ``up_bytes`` (default ``model_bytes``) is what the client sends back.
        """
        ids = np.asarray(client_ids, dtype=np.int64)
        up = model_bytes if up_bytes is None else up_bytes
        work = np.asarray(num_samples, dtype=np.float64) * np.asarray(epochs, dtype=np.float64)
        return model_bytes / self.down_bw(ids) + work / self.speed(ids) + up / self.up_bw(ids)

    def available(self, client_ids: np.ndarray, *, round_idx: int, time: float | np.ndarray = 0.0) -> np.ndarray:
        """Whether each client can take a task in round ``round_idx`` at virtual ``time``."""
        ids = np.asarray(client_ids, dtype=np.int64)
        online = self._windows(ids, time)[0]
        if self.availability.probability < 1.0:
            online &= counter_uniforms(self.seed, ids, _AVAILABLE, round_idx) < self.availability.probability
        return online

    def next_available(self, client_ids: np.ndarray, time: float | np.ndarray) -> np.ndarray:
        """Earliest virtual time >= ``time`` at which each client is online (inf: never again)."""
        return self._windows(np.asarray(client_ids, dtype=np.int64), time)[1]

    def online_until(self, client_ids: np.ndarray, time: float | np.ndarray) -> np.ndarray:
        """When each client online at ``time`` goes offline (inf: never); ``time`` if offline."""
        return self._windows(np.asarray(client_ids, dtype=np.int64), time)[2]

    def drops_out(self, client_ids: np.ndarray, round_idx: int) -> np.ndarray:
        """Whether each client abandons the task it starts in ``round_idx`` (async: the dispatch count)."""
        ids = np.asarray(client_ids, dtype=np.int64)
        if self.dropout == 0.0:  # uniforms are never below 0: skip drawing them
            return np.zeros(ids.shape, dtype=bool)
        return counter_uniforms(self.seed, ids, _DROPOUT, round_idx) < self.dropout

    def _windows(self, ids: np.ndarray, time: float | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(online, next online time, online until) at ``time`` for each client."""
        t = np.broadcast_to(np.asarray(time, dtype=np.float64), ids.shape)
        if self.trace is not None and self.trace.has_intervals:
            return self.trace.windows(ids, t)
        if self.availability.on_s is None or self.availability.off_s == 0:
            return np.ones(ids.shape, dtype=bool), t.copy(), np.full(ids.shape, np.inf)
        on, period = self.availability.on_s, self.availability.on_s + self.availability.off_s
        local = np.mod(t + counter_uniforms(self.seed, ids, _PHASE) * period, period)
        # A time a rounding error short of a window's start is its start, so that a client
        # is online at the time next_available returns.
        local = np.where(period - local <= 1e-9 * np.maximum(1.0, np.abs(t)), 0.0, local)
        online = local < on
        return online, np.where(online, t, t + period - local), np.where(online, t + on - local, t)


@dataclass(frozen=True)
class ClientSystem:
    """What the clocks need to know per client: the system model and each client's training samples."""

    model: SystemModel
    train_sizes: np.ndarray  # samples each client trains on (its holdout for federated evaluation excluded)


def client_system(scenario: Scenario, sizes: np.ndarray) -> ClientSystem | None:
    """The system model of ``scenario.system`` (None when the block is absent), its trace parsed once.

    ``sizes`` are the partition's per-client sample counts; the held-out share of federated
    evaluation (``raysim.client.samples.split_holdout``) is subtracted, since it is never trained on.
    """
    config = scenario.system
    if config is None:
        return None
    trace = load_trace(config.trace) if config.trace else None
    if trace is not None:
        trace.column(np.arange(scenario.num_clients, dtype=np.int64), "speed")  # every client must be listed
    model = SystemModel(
        seed=scenario.seed, speed=config.speed, up_bw=config.up_bw, down_bw=config.down_bw,
        availability=config.availability, dropout=config.dropout, trace=trace,
    )
    return ClientSystem(model=model, train_sizes=train_sizes(sizes, scenario.evaluation.held_out))
