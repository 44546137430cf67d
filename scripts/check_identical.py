"""Acceptance check for a refactor that must keep results bit-identical: every shipped scenario, REF vs the working tree.

It owns one question: does the working tree (HEAD plus uncommitted changes, snapshotted when the check
starts so that edits made meanwhile do not mix in) compute bit for bit what commit REF computed? Each
``scenarios/*.yaml`` (not ``scenarios/studies/``) runs once per tree as ``python -m raysim.cli run`` in a
subprocess with ``PYTHONPATH=<tree>`` and the tree as cwd, so the driver and the Ray workers it starts
import that tree's ``raysim``. Compared: the bytes of ``final_model.npy``, and ``metrics.jsonl`` and
``summary.json`` without the timing and machine-dependent keys (``TIMING_KEYS``, ``TIMING_PATTERN``);
``virtual_time`` and ``virtual_seconds`` come from the deterministic virtual clock and are compared.

Rules, the same for both trees: ``rounds=3`` when a scenario has more; a GPU scenario with a shipped CPU
variant (``x_gpu`` beside ``x_cpu``) is skipped, another runs with ``executor.num_gpus=0``; ``SKIP`` names
the exceptions, with why. Every run gets ``COMMON``, a temp ``output.dir``, RAY_AUTH_MODE=disabled.

    python scripts/check_identical.py 4ff2037 --cache /tmp/identical-cache   # later runs reuse REF's outputs
    python scripts/check_identical.py HEAD --only quickstart,scaffold --ref-dir /tmp/ref

Prints a markdown table, the skipped scenarios and last ``identical: K/N``. Exit 0 when every compared
scenario is identical, 1 otherwise (a failed run counts as not identical), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MAX_ROUNDS = 3
COMMON = ["tracking.wandb=disabled", "tracking.progress=false"]
# Wall-clock seconds, rates and memory; and worker deaths per round, which depend on which worker the
# dynamic load balancing hands each call (faults.kill_worker_every counts a process's calls; models stay identical).
TIMING_KEYS = {"seconds", "compute_seconds", "clients_per_second", "tokens_per_second_per_worker", "worker_rss_mb",
               "wall_seconds", "rounds_per_second", "peak_rss_gb", "worker_failures", "worker_failures_total",
               "startup", "server_cpu_seconds"}  # startup: the start-up profile's seconds
TIMING_PATTERN = re.compile(r"(secagg|he)_\w+_seconds(_mean|_max)?")  # secure aggregation's wall-clock seconds
SKIP = {"cluster_gpu": "a cluster-sized run (100,000 clients, SecAgg+ over about 1,000 a round, 5M samples); "
                       "before 2026-12-07 its partition failed (alpha 0.3, min_size 5) at every commit"}
RUN_TIMEOUT_S = 1800
OUTPUTS = ("final_model.npy", "metrics.jsonl", "summary.json")


def git(*args: str, cwd: Path = ROOT, quiet: bool = False) -> str | None:
    """git's output; None for a failure when ``quiet``, else it raises."""
    done = subprocess.run(["git", *args], cwd=cwd, check=not quiet, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def plan(name: str, text: str | None, tree_names: set[str]) -> tuple[list[str] | None, str]:
    """(overrides, "") for a scenario that runs, or (None, reason) for one that is skipped."""
    if text is None or name not in tree_names:
        return None, f"only in {'the tree' if text is None else 'REF'}"
    if name in SKIP:
        return None, SKIP[name]
    sets = []
    gpus = re.search(r"^[^#]*\bnum_gpus:\s*([0-9.]+)", text, re.M)
    if gpus and float(gpus.group(1)) > 0:
        if name.endswith("_gpu") and name[:-4] + "_cpu" in tree_names:
            return None, f"needs CUDA (executor.num_gpus {gpus.group(1)}); its CPU variant {name[:-4]}_cpu is compared"
        sets.append("executor.num_gpus=0")
    rounds = re.search(r"^rounds:\s*(\d+)", text, re.M)
    if rounds and int(rounds.group(1)) > MAX_ROUNDS:
        sets.append(f"rounds={MAX_ROUNDS}")
    return sets, ""


def strip(value):
    """``value`` without timing keys, at any depth."""
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in TIMING_KEYS and not TIMING_PATTERN.fullmatch(k)}
    return [strip(v) for v in value] if isinstance(value, list) else value


def first_diff(a, b, path: str = "") -> str | None:
    """The path of the first difference of two JSON values (NaN equals NaN; 1 and 1.0 differ), or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{path}{key} (only in {'tree' if key in b else 'ref'})"
            if found := first_diff(a[key], b[key], f"{path}{key}."):
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := first_diff(x, y, f"{path}{i}."))), None)
    return None if json.dumps(a) == json.dumps(b) else path.rstrip(".") or "value"


def metrics_diff(ref: Path, tree: Path) -> str | None:
    """Where the non-timing metrics of two run folders first differ, or None."""
    lines = [[strip(json.loads(line)) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
             for d in (ref, tree)]
    if len(lines[0]) != len(lines[1]):
        return f"metrics.jsonl has {len(lines[0])} lines at ref, {len(lines[1])} in tree"
    for i, (a, b) in enumerate(zip(*lines)):
        if key := first_diff(a, b):
            return f"round {a.get('round', i + 1)}: {key}"
    key = first_diff(*(strip(json.loads((d / "summary.json").read_text())) for d in (ref, tree)))
    return f"summary.json: {key}" if key else None


def model_diff(ref: Path, tree: Path) -> str | None:
    if (ref / "final_model.npy").read_bytes() == (tree / "final_model.npy").read_bytes():
        return None
    x, y = (np.load(d / "final_model.npy") for d in (ref, tree))
    return f"shapes {x.shape} vs {y.shape}" if x.shape != y.shape else f"max abs diff {np.max(np.abs(x - y)):.3g}"


def run(tree: Path, name: str, sets: list[str], work: Path, side: str) -> tuple[Path | None, float, str]:
    """Run one scenario with ``tree``'s raysim: (run folder or None, seconds, error line)."""
    out = work / f"{side}-{name}"
    cmd = [sys.executable, "-m", "raysim.cli", "run", str(tree / "scenarios" / f"{name}.yaml")]
    for value in COMMON + sets + [f"output.dir={out}"]:
        cmd += ["--set", value]
    env = {**os.environ, "PYTHONPATH": str(tree), "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "disabled",
           "RAYSIM_CACHE": str(work / f"raysim-cache-{side}")}
    env.pop("RAY_ADDRESS", None)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None, time.perf_counter() - started, f"{side}: timed out after {RUN_TIMEOUT_S}s"
    seconds = time.perf_counter() - started
    folders = [p.parent for p in out.glob("*/summary.json")]
    if proc.returncode or len(folders) != 1 or not all((folders[0] / f).is_file() for f in OUTPUTS):
        last = [line for line in err.splitlines() if line.strip() and "core_worker.cc" not in line][-1:] or ["no output"]
        return None, seconds, f"{side}: exit {proc.returncode}: {last[0][:160]}"
    return folders[0], seconds, ""


def snapshot(dest: Path) -> Path:
    """A copy of the working tree's files that git tracks or does not ignore."""
    for rel in git("ls-files", "-z", "-co", "--exclude-standard").split("\0"):
        if rel and (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest


def reference(name: str, sets: list[str], commit: str, cache: Path | None, ref_dir: Path, work: Path):
    """REF's run of one scenario, from the cache when it holds one: (run folder or None, seconds shown, error)."""
    key = hashlib.sha1(json.dumps(COMMON + sets).encode()).hexdigest()[:12]
    cached = cache / commit / name / key if cache else None
    if cached and (cached / "meta.json").is_file():
        return cached, f"{json.loads((cached / 'meta.json').read_text())['seconds']:.1f} (cached)", ""
    if not ref_dir.exists():
        git("worktree", "add", "--detach", str(ref_dir), commit)
    out, seconds, err = run(ref_dir, name, sets, work, "ref")
    if cached and out:
        cached.mkdir(parents=True, exist_ok=True)
        for f in OUTPUTS:
            shutil.copy2(out / f, cached / f)
        (cached / "meta.json").write_text(json.dumps({"seconds": seconds, "overrides": COMMON + sets}))
    return out, f"{seconds:.1f}", err


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ref", metavar="REF", help="the commit whose results are the reference")
    ap.add_argument("--cache", type=Path, help="folder keeping REF's outputs, keyed by commit, scenario and overrides")
    ap.add_argument("--only", help="comma-separated scenario names (file stems)")
    ap.add_argument("--ref-dir", type=Path, help="an existing clean checkout of REF (default: a temporary git worktree)")
    ap.add_argument("--tree", type=Path, help="compare this folder's code as-is instead of a snapshot of the working tree")
    args = ap.parse_args()
    if not (commit := git("rev-parse", "--verify", "--quiet", f"{args.ref}^{{commit}}", quiet=True)):
        ap.error(f"REF '{args.ref}' is not a commit")
    if args.ref_dir and (not args.ref_dir.is_dir() or git("rev-parse", "HEAD", cwd=args.ref_dir, quiet=True) != commit
                         or git("status", "--porcelain", "-uno", cwd=args.ref_dir, quiet=True) != ""):
        ap.error(f"--ref-dir {args.ref_dir} is not a clean checkout of {commit[:12]}")
    if args.tree and not (args.tree / "raysim" / "__init__.py").is_file():
        ap.error(f"--tree {args.tree} holds no raysim package")
    ref_texts = {Path(p).stem: git("show", f"{commit}:{p}") for p in git("ls-tree", "--name-only", commit, "scenarios/").split()
                 if p.endswith(".yaml")}
    tree_names = {p.stem for p in ((args.tree or ROOT) / "scenarios").glob("*.yaml")}
    names = sorted(set(ref_texts) | tree_names)
    only = args.only.split(",") if args.only else names
    if unknown := sorted(set(only) - set(names)):
        ap.error(f"--only: unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    work = Path(tempfile.mkdtemp(prefix="check-identical-"))
    tree = args.tree.resolve() if args.tree else snapshot(work / "tree")
    made_worktree = not args.ref_dir
    ref_dir = args.ref_dir.resolve() if args.ref_dir else work / "ref"
    print(f"REF {commit[:12]} against {'the working tree snapshot' if not args.tree else tree}; every run: "
          f"--set {' --set '.join(COMMON)}", file=sys.stderr)
    rows, skipped, same = [], [], 0
    try:
        for name in (n for n in names if n in only):
            sets, why = plan(name, ref_texts.get(name), tree_names)
            if sets is None:
                skipped.append(f"{name}: {why}")
                continue
            ref_out, ref_s, ref_err = reference(name, sets, commit, args.cache, ref_dir, work)
            print(f"[{name}] ref {ref_s} s {ref_err}", file=sys.stderr, flush=True)
            tree_out, tree_s, tree_err = run(tree, name, sets, work, "tree")
            print(f"[{name}] tree {tree_s:.1f} s {tree_err}", file=sys.stderr, flush=True)
            if ref_err or tree_err:
                model, metrics = "error", f"no: {ref_err or tree_err}"
            else:
                model = "no: " + d if (d := model_diff(ref_out, tree_out)) else "yes"
                metrics = "no: " + d if (d := metrics_diff(ref_out, tree_out)) else "yes"
                same += model == metrics == "yes"
            rows.append(f"| {name} | {' '.join(sets) or '-'} | {model} | {metrics} | {ref_s} | {tree_s:.1f} |")
            for side in ("ref", "tree"):
                shutil.rmtree(work / f"{side}-{name}", ignore_errors=True)
    finally:
        if made_worktree and ref_dir.exists():
            git("worktree", "remove", "--force", str(ref_dir))
        shutil.rmtree(work, ignore_errors=True)
    print("| scenario | overrides | model bytes identical | metrics identical | ref s | tree s |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nskipped:" if skipped else "", *(f"- {s}" for s in skipped), sep="\n")
    print(f"identical: {same}/{len(rows)}")
    return 0 if same == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
