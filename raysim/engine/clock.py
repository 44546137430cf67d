"""The deterministic virtual clock: when client tasks finish, and which of them a round keeps.

Durations come from ``raysim.engine.system_model``; here they are ordered, in virtual seconds,
with no real sleeps and with every tie broken by client id, so a schedule is a pure function of
the scenario and its seed.

Synchronous rounds use ``SyncClock``: it over-selects and keeps the first K finishers, as
production FL (Bonawitz et al. 2019, who select 130% of the target) and FedScale (Lai et al.
2022) do, applies an optional round deadline and advances virtual time by the slowest kept
client. The async engine (FedAsync, FedBuff) orders completions with ``VirtualClock`` and uses
``VersionCache`` to know which model versions in-flight clients still need.
"""

from __future__ import annotations

import heapq
from typing import Any, NamedTuple

import numpy as np

from raysim.config import Scenario, oversample_count
from raysim.engine.sampling import sample_clients
from raysim.engine.system_model import ClientSystem
from raysim.errors import ScenarioError


class Event(NamedTuple):
    """A client's task finishing; orders by (finish_time, client_id, seq)."""

    finish_time: float
    client_id: int
    seq: int
    start_time: float
    model_version: int


class VirtualClock:
    """Event queue of in-flight client tasks in virtual seconds; ties go to the lower client id."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = float(now)
        self._heap: list[Event] = []
        self._seq = 0

    def schedule(self, start_time: float, client_ids: np.ndarray, durations: np.ndarray, model_version: int) -> None:
        """Start ``client_ids`` at ``start_time`` from ``model_version``; each finishes after its duration."""
        ids = np.asarray(client_ids, dtype=np.int64)
        d = np.asarray(durations, dtype=np.float64)
        if ids.shape != d.shape or ids.ndim != 1:
            raise ValueError(f"need one duration per client (got {d.shape} for {ids.shape})")
        if not (np.all(np.isfinite(d)) and np.all(d >= 0)):
            raise ValueError("durations must be finite and >= 0; do not schedule clients that never finish")
        if start_time < self.now:
            raise ValueError(f"cannot start tasks in the past (start {start_time} < now {self.now})")
        for cid, finish in zip(ids.tolist(), (start_time + d).tolist()):
            heapq.heappush(self._heap, Event(finish, cid, self._seq, float(start_time), int(model_version)))
            self._seq += 1

    def pop_next(self) -> Event:
        """The next task to finish; advances ``now`` to its finish time."""
        if not self._heap:
            raise IndexError("no client task is in flight")
        event = heapq.heappop(self._heap)
        self.now = max(self.now, event.finish_time)
        return event

    def peek(self) -> Event | None:
        return self._heap[0] if self._heap else None

    def __len__(self) -> int:
        return len(self._heap)


def select_finishers(
    client_ids: np.ndarray, durations: np.ndarray, *, keep: int, deadline: float | None = None
) -> tuple[np.ndarray, float]:
    """Keep the first ``keep`` finishers of a synchronous round (over-selection, FedScale).

    Finishers are ordered by duration, then client id; a duration of inf means the
    client dropped out. With a ``deadline``, finishers after it are not kept. The round
    lasts until the slowest kept client, unless a client the server still waits for
    misses the deadline, in which case it lasts until the deadline.
    Returns (kept client ids in increasing order, round virtual seconds).
    """
    ids = np.asarray(client_ids, dtype=np.int64)
    d = np.asarray(durations, dtype=np.float64)
    if ids.shape != d.shape or ids.ndim != 1:
        raise ValueError(f"need one duration per client (got {d.shape} for {ids.shape})")
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (got {keep})")
    if deadline is not None and not deadline > 0:
        raise ScenarioError(f"system.deadline_s: must be a positive number of seconds (got {deadline})")
    order = np.lexsort((ids, d))
    waiting_for = order[np.isfinite(d[order])][:keep]
    kept = waiting_for if deadline is None else waiting_for[d[waiting_for] <= deadline]
    if kept.size < waiting_for.size:
        seconds = float(deadline)
    else:
        seconds = float(d[kept].max()) if kept.size else 0.0
    return np.sort(ids[kept]), seconds


class VersionCache:
    """Reference counts of the model versions in-flight clients started from.

    The async engine acquires a version (with its payload, e.g. the object ref of that
    global vector) when it dispatches clients from it and releases it as each one
    finishes; a version is forgotten, payload and all, when its count reaches zero.
    """

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}
        self._payloads: dict[int, object] = {}

    def acquire(self, version: int, payload: object = None, count: int = 1) -> object:
        """Hold ``version`` ``count`` more times; the first acquire stores its payload, which is returned."""
        if count < 1:
            raise ValueError(f"count must be >= 1 (got {count})")
        if version not in self._counts:
            self._counts[version] = 0
            self._payloads[version] = payload
        self._counts[version] += count
        return self._payloads[version]

    def release(self, version: int) -> bool:
        """Drop one hold on ``version``; True when that was the last one and it is gone."""
        if version not in self._counts:
            raise ValueError(f"model version {version} is not held")
        self._counts[version] -= 1
        if self._counts[version] == 0:
            del self._counts[version], self._payloads[version]
            return True
        return False

    def get(self, version: int) -> object:
        return self._payloads[version]

    def refcount(self, version: int) -> int:
        return self._counts.get(version, 0)

    def live_versions(self) -> list[int]:
        return sorted(self._counts)

    def __contains__(self, version: object) -> bool:
        return version in self._counts

    def __len__(self) -> int:
        return len(self._counts)


class SyncClock:
    """Synchronous rounds in virtual time: over-selection, the first K finishers and a deadline.

    A client offline at the round's start, or one that drops out (``system.dropout``, or going
    offline before it would finish), never finishes. With ``over_selection`` 1, no deadline and no
    dropout, the clients kept are exactly those sampled without a clock: the clock only adds time.
    """

    def __init__(self, system: ClientSystem, scenario: Scenario, model_bytes: int) -> None:
        self.system, self.model_bytes = system, int(model_bytes)
        self.sampling, self.num_clients, self.seed = scenario.sampling, scenario.num_clients, scenario.seed
        self.over_selection = scenario.system.over_selection
        self.deadline = scenario.system.deadline_s
        self.now = 0.0

    def sample(self, round_index: int) -> np.ndarray:
        """The round's sampled ids: ⌈K·over_selection⌉ of them under uniform sampling."""
        sampling = self.sampling
        if sampling.kind == "uniform":
            count = oversample_count(sampling.clients_per_round, self.over_selection, self.num_clients)
            sampling = sampling.model_copy(update={"clients_per_round": count})
        return sample_clients(sampling, self.num_clients, self.seed, round_index)

    def select(self, sampled: np.ndarray, epochs: np.ndarray, round_index: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """(kept ids, their epochs, timing metrics); advances the clock by the round's virtual seconds."""
        model = self.system.model
        durations = model.duration(sampled, self.system.train_sizes[sampled], epochs, self.model_bytes)
        gone = ~model.available(sampled, round_idx=round_index, time=self.now) | model.drops_out(sampled, round_index)
        gone |= model.online_until(sampled, self.now) < self.now + durations
        durations[gone] = np.inf
        keep = self.sampling.clients_per_round if self.sampling.kind == "uniform" else max(len(sampled), 1)
        kept, seconds = select_finishers(sampled, durations, keep=keep, deadline=self.deadline)
        self.now += seconds
        mask = np.isin(sampled, kept)
        return sampled[mask], epochs[mask], {"virtual_time": self.now, "virtual_seconds": seconds,
                                             "dropouts": int(gone.sum())}
