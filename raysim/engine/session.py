"""A session: one Ray connection, one warm worker pool and one server actor, kept across runs.

``raysim.Session()`` is a context manager; runs inside it (``session.run``, ``raysim.run``, ``raysim sweep``
and the test suite) share its actors. Between runs each worker drops the finished run's state and is
prepared from the next scenario (model, optimizer, pipeline and data views rebuilt, ``WorkerPool.prepare``),
so a run in a warm session gives the same final model, bit for bit, as in a fresh process. The pool is
restarted only when the resource shape (``num_cpus``, ``num_gpus``, the number of workers) changes. A run
outside any session opens a temporary one and closes it at its end.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raysim.config import ExecutorConfig, Scenario
from raysim.engine.cluster import RayNotices, await_exit, connect
from raysim.engine.pool import WorkerPool, shape_of

_active: list[Session] = []  # entered sessions, innermost last


def current() -> Session | None:
    """The innermost session entered in this process, if any."""
    return _active[-1] if _active else None


@contextmanager
def session_for(address: str | None = None) -> Iterator[Session]:
    """The session entered in this process, else a new one for the block (``raysim sweep``)."""
    active = current()
    if active is not None:
        yield active
        return
    with Session(address) as session:
        yield session


class Session:
    """The Ray connection and the actors that runs reuse; see the module docstring."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address
        self.connected = self.owns_ray = False
        self._pool: WorkerPool | None = None
        self._host: Any = None
        self._host_pid: ray.ObjectRef | None = None
        self.pools_started = 0  # how many pools this session has created (tests and reports)
        self.notices = RayNotices()

    def __enter__(self) -> Session:
        self.start()
        _active.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _active.remove(self)
        self.close()

    def start(self) -> None:
        """Connect to Ray (the embedded local one, or ``address``); a no-op once connected."""
        if not self.connected:
            self.notices.install()
            try:
                self.owns_ray = connect(self.address)
            except BaseException:
                self.notices.uninstall()
                raise
            self.connected = True

    def pool(self, executor: ExecutorConfig, num_workers: int) -> WorkerPool:
        """The warm pool when it has this shape; otherwise a new one (the old one is stopped)."""
        if self._pool is not None and self._pool.shape != shape_of(executor, num_workers):
            self._pool.kill()
            self._pool = None
        if self._pool is None:
            self._pool = WorkerPool(executor, num_workers)
            self.pools_started += 1
        return self._pool

    def server_host(self) -> Any:
        """The server actor, on the driver's node since it writes the run folder."""
        if self._host is None:
            from raysim.engine.server_host import ServerHost  # torch: imported beside ray.init (runner)

            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            self._host = ray.remote(num_cpus=0, scheduling_strategy=here)(ServerHost).remote()
            self._host_pid = self._host.process_id.remote()
        return self._host

    def end_run(self, clean: bool) -> None:
        """After a run: the workers and the server drop its state; after a run that did not end cleanly (a lost
        actor, an interrupt) the actors are stopped instead, so no call of that run reaches the next one."""
        self.notices.to(None)
        if not clean:
            self.discard()
            return
        if self._host is not None:
            try:
                ray.get(self._host.stop.remote(), timeout=60)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                ray.kill(self._host)
                self._host = self._host_pid = None
        if self._pool is not None and not self._pool.release():
            self._pool = None

    def discard(self) -> None:
        """Stop the actors; the next run starts new ones. On the embedded Ray, the server actor's process has
        exited when this returns (``cluster.await_exit``), so stopping Ray next cannot orphan it."""
        if self._pool is not None:
            self._pool.kill()
            self._pool = None
        if self._host is not None:
            pid = self._host_process() if self.owns_ray else None
            ray.kill(self._host)
            self._host = self._host_pid = None
            if pid is not None:
                await_exit(pid)

    def _host_process(self) -> int | None:
        """The server actor's process id, asked for when it was created (None if it never answered)."""
        if self._host_pid is None:
            return None
        try:
            return int(ray.get(self._host_pid, timeout=5))
        except ray.exceptions.RayError:
            return None

    def run(self, scenario: Scenario, resume: Path | None = None) -> Any:
        """``raysim.run`` for a parsed scenario, in this session."""
        from raysim.engine.runner import execute

        return execute(scenario, resume=resume, session=self)

    def close(self) -> None:
        """Stop the actors, and Ray itself when this session started it."""
        if not self.connected:
            return
        try:
            if ray.is_initialized():
                self.discard()
        finally:
            if self.owns_ray:
                ray.shutdown()
            self.connected = self.owns_ray = False
            self.notices.uninstall()
