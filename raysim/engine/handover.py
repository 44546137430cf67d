"""What the driver hands a worker after construction, without torch: the run's ``WorkerSetup``, the sealing
of the clients' storage key for it, and ``WorkerNotReady``, the error of a worker that holds no run.

The data travels as object references, which the driver holds for the whole run, so a worker that Ray
restarts mid-run can be prepared again from the same payload. Handing it over after construction also
keeps object references out of the actors' constructor arguments (ray#53727).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import ray

from raysim.config import Scenario
from raysim.privacy.secagg.crypto import keystream_block


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker needs for one run (``ClientWorker.prepare``).

    The clients' storage key and the he backend's secret context travel sealed under the pool's secret,
    which only the workers hold: the server actor relays this payload to restarted workers but cannot read them.
    """

    token: str  # the run's identity: a worker prepared with it already holds this run's state
    scenario: Scenario
    data: tuple[ray.ObjectRef, ...]  # x_train, y_train, the partition's indices and offsets
    feature_shape: tuple[int, ...]
    num_classes: int
    sealed_client_key: bytes | None = None
    sealed_he_key: bytes | None = None  # backend: he: the secret context the clients hold (``privacy.he.keys``)


def seal_for_workers(secret: bytes, key: bytes) -> bytes:
    """``key`` encrypted under the pool's ``secret`` (AES-256-CTR, a fresh random counter block in front)."""
    nonce = secrets.token_bytes(16)
    return nonce + keystream_block(secret, nonce, key)


def open_sealed(secret: bytes, sealed: bytes) -> bytes:
    """The key ``seal_for_workers`` sealed."""
    return keystream_block(secret, sealed[:16], sealed[16:])


class WorkerNotReady(RuntimeError):
    """A call reached a worker that holds no run's state: Ray restarted it, or it was never prepared."""

    def __init__(self, position: int) -> None:
        self.position = position
        super().__init__(f"worker {position} holds no run (it was restarted or never prepared)")

    def __reduce__(self) -> tuple:  # so the position survives the trip through Ray
        return WorkerNotReady, (self.position,)
