"""Run one fuzz case through the real command line, in process, and judge how it was refused.

A case is **rejected** (what we want) when ``raysim.cli.main`` returns 2 with exactly one non-empty
line on stderr, no traceback, a line short enough to read, within the time bound, and nothing left in
the output folder or the working directory. It is **accepted** when validation passes or a run gets as
far as starting Ray (the runner's ``connect`` and ``ray.init`` are tripwires, so no case ever starts
Ray). Anything else, or a malformed-by-construction case that is accepted, has **escaped**.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from raysim.fuzz.schema import DIR, SCENARIO, Case

TIME_BOUND_S = 5.0  # every case, the hostile ones included, is refused faster than this
MAX_MESSAGE_CHARS = 1000  # one line is for a person to read, not 900 KB of echoed input


@dataclass(frozen=True)
class Outcome:
    """How one case ended: ``rejected``, ``accepted`` or ``escaped``, and why."""

    case: Case
    verdict: str
    reason: str
    seconds: float
    stderr: str = field(repr=False, default="")


class _RayWouldStart(BaseException):
    """Raised instead of starting Ray: everything a run checks before Ray has passed."""


class _Timeout(BaseException):
    """A case ran past twice the time bound and was interrupted."""


def warm_up(folder: str | Path) -> None:
    """Import what the cases import (torch, Ray, transformers, datasets) and validate every shipped
    scenario once, so the time bound measures the loader rather than first imports."""
    import datasets  # noqa: F401

    import raysim.engine.runner  # noqa: F401
    from raysim.cli import main

    with _captured():
        for path in sorted(Path(folder).glob("*.yaml")):
            main(["validate", str(path)])


def run_case(case: Case, workdir: str | Path, *, time_bound_s: float = TIME_BOUND_S) -> Outcome:
    """Write the case's files to a fresh folder under ``workdir``, run it and judge it."""
    from raysim.cli import main

    folder = Path(tempfile.mkdtemp(prefix="case-", dir=workdir))
    try:
        for name, content in case.files.items():
            (folder / name).write_bytes(content.replace(DIR.encode(), str(folder).encode()))
        argv = [case.command, str(folder / SCENARIO), *(arg.replace(DIR, str(folder)) for arg in case.overrides)]
        cwd_before = set(os.listdir("."))
        error = ""
        with _captured() as out, _tripwire(), _deadline(2 * time_bound_s):
            started = time.perf_counter()
            try:
                code: Any = main(argv)
            except SystemExit as exit_:
                code = exit_.code
            except _RayWouldStart:
                code = "ray"
            except _Timeout:
                code, error = "timeout", f"still running after {2 * time_bound_s:.0f}s"
            except BaseException as exc:  # the escapes this package exists to find
                code, error = "raised", f"raised {type(exc).__name__}: {str(exc)[:200]}"
            seconds = time.perf_counter() - started
        out_dir = folder / "out"
        left = [str(p.relative_to(folder)) for p in sorted(out_dir.rglob("*"))] if out_dir.exists() else []
        left += sorted(set(os.listdir(".")) - cwd_before)
        verdict, reason = _judge(code, error, out["stdout"], out["stderr"], seconds, left, time_bound_s)
        if verdict == "accepted" and case.must_reject:
            verdict, reason = "escaped", f"accepted malformed input ({reason})"
        return Outcome(case, verdict, reason, seconds, out["stderr"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _judge(code: Any, error: str, stdout: str, stderr: str, seconds: float, left: list[str],
           bound: float) -> tuple[str, str]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    if code == "ray":
        return "accepted", "passed every check made before Ray starts"
    if code == 0:
        return "accepted", "exit 0"
    if error:
        return "escaped", error
    if code != 2:
        return "escaped", f"exit code {code!r}: {' | '.join(lines)[:200]}"
    if "Traceback" in stderr or "Traceback" in stdout:
        return "escaped", "printed a traceback"
    if len(lines) != 1:
        return "escaped", f"{len(lines)} lines on stderr: {' | '.join(lines)[:300]}"
    if len(lines[0]) > MAX_MESSAGE_CHARS:
        return "escaped", f"a message of {len(lines[0])} characters: {lines[0][:150]}..."
    if seconds > bound:
        return "escaped", f"took {seconds:.1f}s (bound {bound:.0f}s)"
    if left:
        return "escaped", f"left files behind: {', '.join(left[:5])}"
    return "rejected", lines[0]


def tally(outcomes: list[Outcome]) -> dict[str, Counter]:
    """Per category, how many cases were rejected, accepted and escaped."""
    counts: dict[str, Counter] = {}
    for outcome in outcomes:
        counts.setdefault(outcome.case.category, Counter())[outcome.verdict] += 1
    return counts


@contextlib.contextmanager
def _captured() -> Iterator[dict[str, str]]:
    """Capture stdout and stderr at the Python level and at the file descriptors (C code, child processes)."""
    result: dict[str, str] = {}
    py_out, py_err = io.StringIO(), io.StringIO()
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as fd_out, tempfile.TemporaryFile() as fd_err:
        saved = os.dup(1), os.dup(2)
        os.dup2(fd_out.fileno(), 1)
        os.dup2(fd_err.fileno(), 2)
        try:
            with contextlib.redirect_stdout(py_out), contextlib.redirect_stderr(py_err):
                yield result
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            fd_out.seek(0)
            fd_err.seek(0)
            result["stdout"] = py_out.getvalue() + fd_out.read().decode("utf-8", "replace")
            result["stderr"] = py_err.getvalue() + fd_err.read().decode("utf-8", "replace")


def _tripwire() -> contextlib.AbstractContextManager[None]:
    """Replace the runner's ``connect`` and ``ray.init`` with a tripwire, so no case starts Ray."""
    from raysim.engine.cluster import no_ray

    return no_ray(_RayWouldStart)


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Interrupt a case that hangs (a grid of 10^12 runs); an alarm already set (pytest-timeout's) is restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise _Timeout

    started = time.monotonic()
    previous = signal.signal(signal.SIGALRM, expire)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if old_delay:
            signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - started), 0.001), old_interval)
