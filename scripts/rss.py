"""Memory measurement for the benchmark scripts: which processes a run owns, and their peak memory.

``MemorySampler`` is a background thread that measures a set of processes every ``interval`` seconds
while a run goes on and keeps the peak of each total (and hands every sample to a callback, for a
script that bins samples by round). The driver's own peak comes from ``ru_maxrss``, which the kernel
keeps, so it needs no sampling.
"""

from __future__ import annotations

import resource
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Usage:
    """Summed resident (RSS) and proportional (PSS, shared pages split between their users) bytes."""

    rss: int = 0
    pss: int = 0


def measure(processes: Iterable[psutil.Process], *, pss: bool = False) -> Usage:
    """The summed memory of ``processes``; one that exits or is out of reach meanwhile counts nothing.

    PSS reads every process's page map, which costs more than RSS: ask for it only when it is reported.
    """
    rss_total = pss_total = 0
    for process in processes:
        try:
            if pss:
                info = process.memory_full_info()
                rss_total, pss_total = rss_total + info.rss, pss_total + info.pss
            else:
                rss_total += process.memory_info().rss
        except psutil.Error:
            continue
    return Usage(rss_total, pss_total)


def raylet() -> psutil.Process:
    """The raylet of this driver's Ray session: every worker, actor and agent of the session descends from it."""
    import ray

    return psutil.Process(ray._private.worker._global_node.all_processes["raylet"][0].process.pid)


def session_processes() -> list[psutil.Process]:
    """This driver, its Ray session's raylet and GCS, and every process the raylet started, at this instant
    (sum their PSS: shared pages such as the object store's then count once)."""
    import ray

    node = raylet()
    gcs = psutil.Process(ray._private.worker._global_node.all_processes["gcs_server"][0].process.pid)
    return [psutil.Process(), node, gcs, *node.children(recursive=True)]


def driver_peak_rss() -> int:
    """The peak resident bytes of this process so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MemorySampler:
    """While open, calls ``sample`` now and every ``interval`` seconds; ``peak`` is the largest RSS and PSS seen.

    ``on_sample`` (when given) receives each sample as it is taken.
    """

    def __init__(self, sample: Callable[[], Usage], *, interval: float = 0.5,
                 on_sample: Callable[[Usage], None] | None = None) -> None:
        self.sample, self.interval, self.on_sample = sample, interval, on_sample
        self.peak = Usage()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            usage = self.sample()
            self.peak = Usage(max(self.peak.rss, usage.rss), max(self.peak.pss, usage.pss))
            if self.on_sample is not None:
                self.on_sample(usage)
            self._stop.wait(self.interval)
