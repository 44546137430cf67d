"""Connecting to Ray and sizing the worker pool from the cluster's resources.

``raysim run`` joins an existing cluster when ``RAY_ADDRESS`` is set or ``--address`` is given, and
otherwise starts the embedded local Ray. Impossible resource requests fail before any actor starts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
from pathlib import Path
from typing import Any, Iterator

import ray

from raysim.config import ExecutorConfig
from raysim.errors import ScenarioError


PROBE_SECONDS = 5.0
DIRECT_RESULT_BYTES = 4 * 2**20  # the embedded Ray's max_direct_call_object_size


class RayNotices(logging.Handler):
    """Ray's own Python log records (such as its token-authentication notice), kept off the console from the
    moment a session connects until it closes, and written to the current run folder's ``ray.log``; what
    arrives between runs waits for the next one."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.waiting: list[str] = []
        self.path: Path | None = None
        self.saved: list[logging.Handler] | None = None

    def install(self) -> None:
        logger = logging.getLogger("ray")
        if self.saved is None:
            self.saved, logger.handlers = logger.handlers[:], [self]

    def uninstall(self) -> None:
        if self.saved is not None:
            logging.getLogger("ray").handlers, self.saved = self.saved, None

    def to(self, path: Path | None) -> None:
        """Write to ``path`` from now on (None: hold the lines for the next run)."""
        with self.lock:
            self.path = path
            if path is not None and self.waiting:
                self._append(self.waiting)
                self.waiting = []

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        if self.path is None:
            self.waiting.append(line)
        else:
            self._append([line])

    def _append(self, lines: list[str]) -> None:
        with open(self.path, "a", encoding="utf-8") as log:
            log.write("".join(line + "\n" for line in lines))


def connect(address: str | None = None) -> bool:
    """Make sure Ray is running; True when this call started a local instance that we own.

    Without an address the embedded local Ray starts. An address (``--address`` or ``RAY_ADDRESS``;
    ``auto`` for the cluster this machine belongs to) joins that cluster. ``host:port`` and
    ``ray://host:port`` are probed with a TCP connect first, because ``ray.init`` retries an
    unreachable GCS for minutes; an address that does not answer within ``PROBE_SECONDS`` is one line.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        _probe(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ScenarioError(f"--address: cannot reach the Ray cluster at {address} ({type(err).__name__}); check RAY_ADDRESS or start the cluster") from None
        return False
    start_local(logging_level=logging.WARNING, log_to_driver=False)
    return True


def start_local(**options: Any) -> None:
    """``ray.init(address="local", include_dashboard=False, **options)``, lean: a simulation on one machine never
    uses the head's autoscaler monitor (nothing autoscales here), its log monitor (raysim's workers print
    nothing to the driver; their logs stay in Ray's session folder) or its dashboard API server (no
    dashboard, job submission or state API server runs on the embedded Ray), and its dashboard agent runs
    in Ray's own ``--minimal`` mode (no Prometheus metrics, log or job modules). The raylet waits for that
    agent before it registers, and on 2 cores these four cost ``ray.init`` about 1.5 s and ``ray.shutdown``
    the monitor's 1 s graceful stop (``scripts/bench_startup.py``). The GCS, the raylet, the runtime-env
    agent and the workers are Ray's own, unchanged.

    Ray's task events are off (``task_events_report_interval_ms: 0``): they feed the state API and the dashboard's
    task views, which the embedded Ray does not run, and ``ray.timeline()``. With them on, the driver's
    ``ray.shutdown`` waited 0.25 s to flush its last batch to a GCS about to stop (``scripts/bench_startup.py``).
    For Ray's task timeline, start a cluster with ``ray start --head`` and pass its address.

    Results of up to ``DIRECT_RESULT_BYTES`` go from a worker to its caller inside the call's reply, not through
    the object store (Ray's default is 100 KiB): a sync round's packs return one float64 partial sum per
    chunk, 385 KB for five chunks of a 9,610-parameter MLP, and the store's create, seal, pin and release of
    every such result kept the raylet at 13 % of a core in a vectorized run (1 % inline; 27 → 25 ms a round).

    "local" starts a fresh instance even when /tmp/ray/ray_current_cluster names another one. For the
    dashboard, start a cluster with ``ray start --head`` and pass its address instead.
    """
    import ray._private.node as node
    import ray._private.utils as utils

    class SimulationHead(node.Node):
        def start_monitor(self) -> None:
            pass

        def start_log_monitor(self) -> None:
            pass

        def start_api_server(self, *, include_dashboard: bool | None, raise_on_failure: bool) -> None:
            self._webui_url = None  # as after an API server that failed to start, which Ray allows

    def minimal_agent() -> ImportError:  # what a ray installed without [default] answers; the agent reads --minimal
        return ImportError("raysim's embedded Ray runs the dashboard agent minimal")

    with _LOCAL_START, _swapped(node, "Node", SimulationHead), \
            _swapped(utils, "get_dashboard_dependency_error", minimal_agent):
        system = {"max_direct_call_object_size": DIRECT_RESULT_BYTES, "task_events_report_interval_ms": 0,
                  **options.pop("_system_config", {})}
        ray.init(address="local", include_dashboard=False, _system_config=system, **options)


_LOCAL_START = threading.Lock()  # the swaps below are for one ray.init call at a time


@contextlib.contextmanager
def _swapped(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.name`` is ``value`` within the block (Ray looks both up at call time)."""
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def await_exit(pid: int, seconds: float = 2.0) -> bool:
    """Wait until process ``pid`` on this machine has exited (a zombie has), and SIGKILL it if it is still running
    after ``seconds``; returns whether it had to be killed. For a killed actor of the embedded Ray, before
    ``ray.shutdown``: a worker process still running when its raylet stops gets a SIGTERM, and the exit that
    starts can hang in Ray's own C++ exit handlers (a pubsub publisher's destructor waits on a mutex that the
    io service's shutdown holds; seen in the server actor, about one run in 50), leaving the process behind,
    orphaned, once its raylet is gone."""
    import time

    import psutil  # only at a session's close

    try:
        process = psutil.Process(pid)
        deadline = time.monotonic() + seconds
        while process.status() != psutil.STATUS_ZOMBIE:
            if time.monotonic() > deadline:
                process.kill()  # psutil checks the pid still names the process it found
                return True
            time.sleep(0.002)
    except psutil.NoSuchProcess:
        pass
    return False


def _probe(address: str) -> None:
    """Fail fast, with one line, when nothing listens at ``address``'s host and port."""
    target = address.removeprefix("ray://")
    if target == "auto":
        return
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ScenarioError(f"--address: '{address}' is not host:port (e.g. 10.0.0.5:6379 or ray://10.0.0.5:10001); fix RAY_ADDRESS or --address")
    host = host.strip("[]")
    if host in ("localhost", "127.0.0.1") and not address.startswith("ray://"):
        host = ray.util.get_node_ip_address()  # ray.init dials a local GCS at the node's address
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_SECONDS).close()
    except OSError as err:
        reason = f"timed out after {PROBE_SECONDS:g}s" if isinstance(err, TimeoutError) else (err.strerror or type(err).__name__).lower()
        raise ScenarioError(
            f"--address: no Ray cluster answers at {address} ({reason}); "
            "start it with `ray start --head` or `ray up cluster.yaml`, or unset RAY_ADDRESS to run locally"
        ) from None


def plan_workers(executor: ExecutorConfig, resources: dict[str, float]) -> int:
    """The number of worker actors, checked against what the cluster can ever schedule."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if executor.num_gpus > gpus:
        raise ScenarioError(
            f"executor.num_gpus: each worker asks for {executor.num_gpus} GPU but the cluster has {gpus:g}; "
            "set executor.num_gpus: 0 or run on a GPU cluster"
        )
    if executor.num_cpus > cpus:
        raise ScenarioError(f"executor.num_cpus: each worker asks for {executor.num_cpus} CPU but the cluster has {cpus:g}; lower it")
    limits = []
    if executor.num_cpus > 0:
        limits.append(math.floor(cpus / executor.num_cpus + 1e-9))
    if executor.num_gpus > 0:
        limits.append(math.floor(gpus / executor.num_gpus + 1e-9))
    fits = min(limits) if limits else max(1, int(cpus))
    if executor.num_workers == "auto":
        return max(1, fits)
    if executor.num_workers > fits:
        raise ScenarioError(
            f"executor.num_workers: {executor.num_workers} workers of {executor.num_cpus:g} CPU / {executor.num_gpus:g} GPU "
            f"do not fit the cluster ({cpus:g} CPU, {gpus:g} GPU; at most {fits}); lower it or use 'auto'"
        )
    return executor.num_workers


def available_workers(executor: ExecutorConfig) -> int:
    """``plan_workers`` against the connected cluster's resources."""
    return plan_workers(executor, ray.cluster_resources())


@contextlib.contextmanager
def no_ray(error: type[BaseException]) -> Iterator[None]:
    """Within the block, starting or joining Ray raises ``error``, even inside a session (the fuzz harness
    runs no case on Ray)."""
    import raysim.engine.session as session

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise error

    saved, entered = (session.connect, ray.init), session._active[:]
    session.connect, ray.init = refuse, refuse
    session._active.clear()  # a session already connected would otherwise let the run through
    try:
        yield
    finally:
        session.connect, ray.init = saved
        session._active[:] = entered
