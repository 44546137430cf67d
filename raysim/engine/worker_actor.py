"""The worker actor's class as the driver sees it: a shell whose module imports neither torch nor the client pipeline.

``ray.remote`` needs an actor's class in the driver, and ``ClientWorker``'s module imports torch and the whole
client pipeline: about 2 CPU-seconds, which the driver paid beside ``ray.init`` on 2 cores although it never
trains (``scripts/bench_startup.py``). The pool's actors are ``WorkerActor``s instead: each remote method
forwards to a ``ClientWorker`` that the actor's own process imports and builds in the constructor.
"""

from __future__ import annotations

from typing import Any, Callable

# ClientWorker's methods that the engine calls remotely (tests/test_session.py checks this list against the class).
REMOTE_METHODS = ("prepare", "release", "train", "train_pack", "train_many", "secure_phase", "end_secure_round",
                  "secure_plain_sum", "secure_encoded_sum", "evaluate", "evaluate_personal", "evaluate_test",
                  "initial_vector", "placement")


class WorkerActor:
    """A pool slot: ``ClientWorker(position, num_gpus, pool_secret)`` built in the actor, its remote methods forwarded."""

    def __init__(self, position: int = 0, num_gpus: float = 0.0, pool_secret: bytes | None = None) -> None:
        from raysim.engine.worker import ClientWorker

        self.body = ClientWorker(position, num_gpus, pool_secret)


def _forward(name: str) -> Callable[..., Any]:
    def method(self: WorkerActor, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.body, name)(*args, **kwargs)

    method.__name__, method.__qualname__ = name, f"WorkerActor.{name}"
    return method


for _name in REMOTE_METHODS:
    setattr(WorkerActor, _name, _forward(_name))
