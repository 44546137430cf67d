"""The server actor: one warm process, kept across a session's runs, that holds one run's server body at a time.

Starting an actor costs a process and torch's imports (seconds on 2 busy cores); a session pays that once.
The host takes no warm-up step: the server never builds a torch optimizer, whose first construction
alone imports ``torch._dynamo`` (1.8 s here), and its first forward pass, for evaluation, is cheap.
``start`` builds the run's ``RoundServer`` or ``AsyncServer`` from the same arguments as before, the
other methods delegate to it, and ``stop`` drops it, with everything it held. The host adds no channel:
the server body receives only what the protocol releases to it, as in its own actor.
"""

from __future__ import annotations

import gc
import os
from typing import Any

import numpy as np


class ServerHost:
    """The body of the server actor; the run's server is ``start``ed into it and ``stop``ped after."""

    def __init__(self) -> None:
        from raysim.engine.async_server import AsyncServer
        from raysim.engine.server import RoundServer

        self.kinds = {False: RoundServer, True: AsyncServer}  # imported here: the driver imports this module
        self.server: Any = None

    def start(self, asynchronous: bool, *args: Any, **kwargs: Any) -> None:
        """Build the run's server (async: a ``run_round`` is a server step)."""
        self.server = self.kinds[asynchronous](*args, **kwargs)

    def process_id(self) -> int:
        """This actor's process (the session waits for it to exit before stopping the embedded Ray)."""
        return os.getpid()

    def stop(self) -> None:
        """Drop the run's server and all it holds, as killing its own actor did (a failed run's stores are left
        as they are: a resume restores them from the checkpoint)."""
        self.server = None
        gc.collect()

    def run_round(self, round_index: int) -> dict[str, Any]:
        return self.server.run_round(round_index)

    def secure_release(self) -> Any:
        return self.server.secure_release()

    def save_checkpoint(self, rounds_done: int) -> str:
        return self.server.save_checkpoint(rounds_done)

    def restore_checkpoint(self, path: str, rounds_done: int) -> None:
        self.server.restore_checkpoint(path, rounds_done)

    def global_vector(self) -> np.ndarray:
        return self.server.global_vector()

    def privacy_report(self) -> dict[str, Any] | None:
        return self.server.privacy_report()

    def close(self) -> None:
        self.server.close()
