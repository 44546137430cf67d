"""Worker fault injection for chaos testing (the ``faults:`` block's engine half): dying and slow workers.

Misbehaving clients are a stage of the client pipeline (``raysim.client.faults``). Worker faults are
per process: a worker exits at every ``kill_worker_every``-th train call of its life (Ray restarts it
and the engine re-runs the call), and the worker at position ``delay_worker`` sleeps before each call. Neither changes a
result, only the time and the failure count, which is what they exist to test.
"""

from __future__ import annotations

import os
import time

from raysim.config import FaultsConfig


class WorkerChaos:
    """What a worker process does before each train call when the scenario injects worker faults."""

    def __init__(self, faults: FaultsConfig | None, position: int) -> None:
        self.faults, self.position, self.calls = faults, position, 0

    def before_call(self) -> None:
        if self.faults is None:
            return
        self.calls += 1
        every = self.faults.kill_worker_every
        if every is not None and self.calls % every == 0:
            os._exit(1)  # a hard crash: no cleanup, exactly like the OOM killer or a lost node
        if self.faults.delay_worker == self.position and self.faults.delay_seconds > 0:
            time.sleep(self.faults.delay_seconds)
