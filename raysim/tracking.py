"""Where a run's results go: the run folder (written atomically), metrics.jsonl, W&B and a progress bar.

Every file is written to a temporary name, fsynced and renamed, and each metrics line is appended with
a single ``write`` of a whole line (fsynced at checkpoints and at the end), so a crash never leaves a
half-written file or line behind.
Whatever goes to W&B passes through ``scrub`` first, so no credential is ever logged.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from raysim.atomic import fsync_path, write_atomic
from raysim.config import Scenario, TrackingConfig, scenario_to_yaml
from raysim.errors import ScenarioError, first_line
from raysim.privacy.dp.sampling import epsilon_caveat, sampling_assumption


def to_jsonable(value: Any) -> Any:
    """Numpy scalars and arrays as plain JSON values."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


class RunFolder:
    """``<output.dir>/<name>/``: config.yaml, partition.json, metrics.jsonl, summary.json, final_model.npy."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, scenario: Scenario) -> RunFolder:
        """A fresh folder for the run; an existing one gets a numbered sibling unless ``output.overwrite``."""
        base = Path(scenario.output.dir) / scenario.name
        path, suffix = base, 2
        while path.exists() and not scenario.output.overwrite:
            path, suffix = base.with_name(f"{scenario.name}-{suffix}"), suffix + 1
        path.mkdir(parents=True, exist_ok=True)
        (path / "metrics.jsonl").unlink(missing_ok=True)
        return cls(path)

    def write_json(self, name: str, payload: dict[str, Any]) -> None:
        write_atomic(self.path / name, json.dumps(to_jsonable(payload), indent=2, allow_nan=True) + "\n")

    def write_config(self, scenario: Scenario) -> None:
        write_atomic(self.path / "config.yaml", scenario_to_yaml(scenario))

    def write_model(self, vector: np.ndarray) -> None:
        write_atomic(self.path / "final_model.npy", lambda handle: np.save(handle, vector))

    def keep_metrics(self, rounds_done: int) -> list[dict[str, Any]]:
        """Cut metrics.jsonl back to the rounds a resumed run keeps (``round`` ≤ ``rounds_done``, up to the
        first damaged line) and return them; the file is rewritten atomically if anything goes."""
        path = self.path / "metrics.jsonl"
        try:
            lines = path.read_bytes().split(b"\n")
        except FileNotFoundError:
            return []
        kept: list[dict[str, Any]] = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                break
            if not isinstance(record, dict) or not isinstance(record.get("round"), int) or record["round"] > rounds_done:
                break
            kept.append(record)
        text = "".join(json.dumps(r, allow_nan=True) + "\n" for r in kept)
        if text.encode("utf-8") != path.read_bytes():
            write_atomic(path, text)
        return kept

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one whole line (one ``write``, so it cannot tear); ``sync_metrics`` makes it durable."""
        line = (json.dumps(to_jsonable(record), allow_nan=True) + "\n").encode("utf-8")
        fd = os.open(self.path / "metrics.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def sync_metrics(self) -> None:
        """fsync the metrics file: at each checkpoint and at the end of a run, which bound what a crash loses."""
        path = self.path / "metrics.jsonl"
        if path.exists():
            fsync_path(path)


def resolve_wandb_mode(config: TrackingConfig, env: dict[str, str] | None = None) -> tuple[str, str]:
    """(mode, reason): the scenario's setting, then WANDB_MODE, then online with an API key, else offline."""
    env = dict(os.environ) if env is None else env
    if config.wandb:
        return config.wandb, "set by tracking.wandb"
    if env.get("WANDB_MODE"):
        mode = {"dryrun": "offline"}.get(env["WANDB_MODE"], env["WANDB_MODE"])
        return mode, "set by WANDB_MODE"
    if env.get("WANDB_API_KEY") or _netrc_has_wandb():
        return "online", "an API key is configured"
    return "offline", "no API key is configured"


def _netrc_has_wandb() -> bool:
    netrc = Path.home() / ".netrc"
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


SECRET_KEY = re.compile(r"key|token|secret|password", re.IGNORECASE)
SECRET_VARIABLE = re.compile(r"(key|token|secret|password|passwd)$", re.IGNORECASE)
REDACTED = "[redacted]"


def _secret_values(env: dict[str, str]) -> list[str]:
    """Values of environment variables named like credentials (WANDB_API_KEY, HF_TOKEN, ..._SECRET)."""
    return [value for name, value in env.items() if SECRET_VARIABLE.search(name) and len(value) >= 8]


def scrub(value: Any, env: dict[str, str] | None = None) -> Any:
    """A copy of ``value`` that is safe to log: no credential can leave the process through it.

    A mapping entry whose key matches /key|token|secret|password/i has its text replaced by
    ``[redacted]`` (numbers and booleans stay: ``key_bits: 2048`` is a parameter, not a credential),
    and any text that contains the value of a credential-like environment variable is redacted.
    """
    secrets = _secret_values(dict(os.environ) if env is None else env)

    def clean(item: Any, secret_key: bool) -> Any:
        if isinstance(item, dict):
            return {k: clean(v, secret_key or bool(SECRET_KEY.search(str(k)))) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [clean(v, secret_key) for v in item]
        if isinstance(item, (str, bytes)):
            text = item.decode("utf-8", "replace") if isinstance(item, bytes) else item
            return REDACTED if secret_key or any(s in text for s in secrets) else item
        return item

    return clean(to_jsonable(value), False)


_announced: set[tuple[str, str]] = set()


def _announce(mode: str, reason: str) -> None:
    """Say once per process which W&B mode was chosen and why (a sweep does not repeat it)."""
    if (mode, reason) not in _announced:
        _announced.add((mode, reason))
        later = "; sync later with `wandb sync <run folder>/wandb`" if mode == "offline" else ""
        print(f"raysim: W&B mode {mode} ({reason}){later}", file=sys.stderr)


class Tracker:
    """Logs each round to metrics.jsonl, W&B (when enabled) and the progress bar, from the driver only.

    W&B gets the resolved scenario as its config, one history row per round with ``round`` as the
    step metric (so synchronous and asynchronous runs share an x-axis), and the summary at the end.
    Runs of a sweep share ``tracking.group``. Everything sent to W&B passes through ``scrub``.

    With privacy, the W&B summary carries ``epsilon_assumption`` (what ε assumes about client sampling)
    from the start, and the bar shows ε, starred (``ε*``) when the sampling is not what the accountant
    assumes; the note behind the star is printed once.
    """

    def __init__(self, folder: RunFolder, scenario: Scenario, done: int = 0) -> None:
        self.folder = folder
        self.bar = tqdm(total=scenario.rounds, initial=done, unit="round", desc=scenario.name, file=sys.stderr,
                        disable=not (scenario.tracking.progress and sys.stderr.isatty()))
        self.epsilon_note = epsilon_caveat(scenario)
        self.epsilon_label = "ε" if self.epsilon_note is None else "ε*"
        mode, reason = resolve_wandb_mode(scenario.tracking)
        self.wandb_run = None
        if mode != "disabled":
            _announce(mode, reason)
            self.wandb_run = _start_wandb(folder, scenario, mode)
            if scenario.privacy is not None:
                self.wandb_run.summary.update(scrub({"epsilon_assumption": sampling_assumption(scenario)}))

    def log(self, metrics: dict[str, Any]) -> None:
        self.folder.append_metrics(metrics)
        if self.wandb_run is not None:
            self.wandb_run.log(scrub(metrics))
        shown = {k: f"{metrics[k]:.4f}" for k in ("loss", "accuracy") if isinstance(metrics.get(k), float)}
        if isinstance(metrics.get("epsilon"), float):
            shown[self.epsilon_label] = f"{metrics['epsilon']:.3f}"
            if self.epsilon_note is not None and not self.bar.disable:
                self.bar.write(f"raysim: ε* {self.epsilon_note}", file=sys.stderr)
                self.epsilon_note = None  # once
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def finish(self, summary: dict[str, Any]) -> None:
        self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.summary.update(scrub(summary))
            self.wandb_run.finish()
            self.wandb_run = None

    def abort(self) -> None:
        """Close the progress bar and mark the W&B run failed (a no-op after ``finish``)."""
        self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1)
            self.wandb_run = None


def _start_wandb(folder: RunFolder, scenario: Scenario, mode: str) -> Any:
    """A W&B run in ``<run dir>/wandb/``; a failure to start is one line naming tracking.wandb."""
    import wandb

    tracking = scenario.tracking
    id_file = folder.path / "wandb_run_id"  # a resumed run continues the same W&B run
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    try:
        run = wandb.init(
            project=tracking.project, name=folder.path.name, group=tracking.group, id=run_id, resume="allow",
            config=scrub(scenario.model_dump(mode="json")), dir=str(folder.path), mode=mode,
            reinit="finish_previous", settings=wandb.Settings(console="off", quiet=True, silent=True),  # raysim says the mode itself
        )
    except (wandb.Error, OSError, ValueError) as err:
        raise ScenarioError(
            f"tracking.wandb: W&B could not start in {mode} mode ({scrub(first_line(err))}); "
            "set tracking.wandb: offline (or WANDB_MODE=offline) and sync later with `wandb sync`"
        ) from None
    write_atomic(id_file, run_id + "\n")
    run.define_metric("round")
    run.define_metric("*", step_metric="round")
    return run
