"""Where the seconds go between a process's start and its first round.

``StartupProfile`` records named spans as (start, seconds), the start counted from the process's start
for a process's first run (Linux's /proc tells when the interpreter started) and from the run's call
otherwise (a warm session). Spans that overlap, such as the data loading that runs beside ``ray.init``,
show it in their starts. The table lands in summary.json as ``startup`` and is printed by
``raysim run --profile-startup``.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

_first_run = [True]


def process_start() -> float | None:
    """The wall-clock time this process started, from /proc (None where there is no /proc)."""
    try:
        with open("/proc/self/stat") as stat:
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as uptime:
            up = float(uptime.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - (up - started_ticks / os.sysconf("SC_CLK_TCK"))


class StartupProfile:
    """Named spans of one run's start-up; see the module docstring."""

    def __init__(self) -> None:
        called = time.time()
        origin = process_start() if _first_run[0] else None
        _first_run[0] = False
        self.origin = called if origin is None else min(origin, called)
        self.rows: list[tuple[str, float, float]] = []
        if origin is not None:
            self.add("python and imports (to the run's call)", self.origin, called - self.origin)

    def add(self, name: str, start: float, seconds: float) -> None:
        self.rows.append((name, start, seconds))

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        start = time.time()
        try:
            yield
        finally:
            self.add(name, start, time.time() - start)

    def table(self) -> dict[str, dict[str, float]]:
        """name → {start (s after the origin), seconds}, in start order."""
        return {name: {"start": round(start - self.origin, 3), "seconds": round(seconds, 3)}
                for name, start, seconds in sorted(self.rows, key=lambda row: row[1])}

    def format(self) -> str:
        lines = [f"{'start-up phase':<44} {'start s':>8} {'seconds':>8}"]
        lines += [f"{name:<44} {row['start']:>8.3f} {row['seconds']:>8.3f}" for name, row in self.table().items()]
        return "\n".join(lines)


class Background:
    """``fn(*args)`` on a thread, timed as the span ``name``; ``result()`` joins it and re-raises its error."""

    def __init__(self, profile: StartupProfile, name: str, fn: Callable[..., Any], *args: Any) -> None:
        self.value: Any = None
        self.error: BaseException | None = None

        def work() -> None:
            with profile.span(name):
                try:
                    self.value = fn(*args)
                except BaseException as err:  # re-raised in the caller's thread
                    self.error = err

        self.thread = threading.Thread(target=work, name="raysim-startup", daemon=True)
        self.thread.start()

    def result(self) -> Any:
        """The value, handed over once: this object keeps no reference to it (the run drops the data after
        ``ray.put``)."""
        self.thread.join()
        if self.error is not None:
            raise self.error
        value, self.value = self.value, None
        return value
