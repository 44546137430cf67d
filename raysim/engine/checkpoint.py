"""Checkpoints: the server's whole state after a round, written so that a crash never leaves a torn one.

A checkpoint is a folder ``<run>/checkpoints/round-NNNNNNN/`` holding ``state.pkl`` (the server's
state: global vector, strategy and optimizer state, accountants, clocks, the async schedule with
its RNG and the model versions in-flight clients still need) and a copy of every file of the
run's disk-backed client state store. It is written under a temporary name, every file and the
folder are fsynced, and it is renamed into place; only then does ``LATEST`` (itself replaced
atomically) point at it. Older checkpoints beyond ``keep`` are removed afterwards, so at every
instant at least one complete checkpoint exists.

Everything else a round draws at random comes from counter-based generators keyed by
(seed, round, client), so restoring this state is enough for a resumed run to be bit-identical.
The files are pickles written by raysim for raysim: load only checkpoints you wrote.
"""

from __future__ import annotations

import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysim.atomic import fsync_path, write_atomic
from raysim.errors import ScenarioError

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
STATE_FILE = "state.pkl"
STORE_DIR = "client_state"


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint: the rounds it has finished and its folder."""

    rounds_done: int
    path: Path

    def load_state(self) -> dict[str, Any]:
        with open(self.path / STATE_FILE, "rb") as handle:
            return pickle.load(handle)


def save(run_dir: Path, rounds_done: int, state: dict[str, Any], *, store_dir: Path | None, keep: int) -> Checkpoint:
    """Write the checkpoint of ``rounds_done`` finished rounds; returns it once it is durable."""
    root = run_dir / CHECKPOINTS
    root.mkdir(exist_ok=True)
    name = f"round-{rounds_done:07d}"
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_atomic(tmp / STATE_FILE, lambda handle: pickle.dump(state, handle, protocol=pickle.HIGHEST_PROTOCOL))
    if store_dir is not None and store_dir.is_dir():
        copy = tmp / STORE_DIR
        shutil.copytree(store_dir, copy)
        for path in copy.iterdir():
            fsync_path(path)
        fsync_path(copy)
    fsync_path(tmp)
    target = root / name
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    fsync_path(root)
    write_atomic(root / LATEST, name + "\n")
    for old in sorted(p for p in root.glob("round-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return Checkpoint(rounds_done, target)


def latest(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint of ``run_dir``, or None if it has none."""
    root = run_dir / CHECKPOINTS
    try:
        name = (root / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    path = root / name
    if not name.startswith("round-") or not (path / STATE_FILE).is_file():
        raise ScenarioError(f"--resume: {root / LATEST} names '{name}', which is not a complete checkpoint; "
                            "the run folder was edited by hand, start a new run")
    return Checkpoint(int(name.removeprefix("round-")), path)


def restore_store_files(checkpoint: Checkpoint, store_dir: Path) -> None:
    """Put the checkpoint's copy of the client state store back in ``store_dir``."""
    saved = checkpoint.path / STORE_DIR
    if saved.is_dir():
        shutil.rmtree(store_dir, ignore_errors=True)
        shutil.copytree(saved, store_dir)
