"""The command line: ``raysim run | resume | validate | sweep | report | attack``.

Every user error ends in one line naming the field and the fix, and exit code 2, with no traceback.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import threading
from pathlib import Path
from typing import NoReturn, Sequence

from raysim.config import Scenario, scenario_to_yaml
from raysim.engine.validation import load_and_validate
from raysim.errors import ScenarioError

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raysim", description="Federated learning simulation on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a scenario")
    run.add_argument("scenario", help="path to a scenario YAML file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a scenario value, e.g. --set training.lr=0.1 (repeatable)")
    run.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    run.add_argument("--resume", action="store_true",
                     help="continue this scenario's run folder (output.dir/name) from its newest checkpoint")
    run.add_argument("--profile-startup", action="store_true",
                     help="print where the seconds went between the process start and the first round")
    resume = commands.add_parser("resume", help="continue a run from its newest checkpoint")
    resume.add_argument("run_dir", type=Path, help="the run folder, e.g. results/quickstart")
    resume.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    validate = commands.add_parser("validate", help="check a scenario without running it")
    validate.add_argument("scenario")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    validate.add_argument("--print", action="store_true", help="print the resolved scenario")
    sweep = commands.add_parser("sweep", help="run every point of a study's grid and tabulate the results")
    sweep.add_argument("study", help="path to a study YAML file (base scenario + grid)")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="override a value of the base scenario for every run, e.g. --set rounds=3")
    sweep.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    sweep.add_argument("--dry-run", action="store_true", help="validate and list the runs without running them")
    report = commands.add_parser("report", help="draw plots of one run, or overlay several")
    report.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders, e.g. results/quickstart")
    report.add_argument("--out", type=Path, default=None,
                        help="folder for the PNGs (default: RUN_DIR/plots for one run, ./report for several)")
    attack = commands.add_parser("attack", help="attack what the server saw in a run (the leakage lab)")
    attack.add_argument("run_dir", type=Path, help="a run folder whose scenario had a leakage block")
    attack.add_argument("--round", type=int, default=1, help="the recorded round to invert (default 1)")
    attack.add_argument("--attack", choices=["idlg", "dlg", "geiping"], default="idlg")
    attack.add_argument("--client", type=int, default=None, help="the victim (default: the first one the view allows)")
    attack.add_argument("--iterations", type=int, default=300)
    attack.add_argument("--membership", action="store_true",
                        help="instead, the loss-threshold membership-inference attack on the final model")
    attack.add_argument("--shadows", type=int, default=0,
                        help="with --membership: also the LiRA-style attack with this many shadow models (runs)")
    return parser


def _attack(args: argparse.Namespace) -> int:
    from raysim.engine.attack import attack_round, membership

    if not (args.run_dir / "config.yaml").exists():
        raise ScenarioError(f"run_dir: {args.run_dir} holds no config.yaml; give a run folder, e.g. results/<name>")
    result = membership(args.run_dir, shadows=args.shadows) if args.membership else \
        attack_round(args.run_dir, args.round, args.attack, args.client, args.iterations)
    print(json.dumps(result))
    return 0


def _run(args: argparse.Namespace) -> int:
    scenario = load_and_validate(args.scenario, args.overrides)
    run_dir = None
    if args.resume:
        run_dir = Path(scenario.output.dir) / scenario.name
        saved = _resumable(run_dir, "--resume")
        if saved != scenario:
            field = next(k for k in type(scenario).model_fields if getattr(saved, k) != getattr(scenario, k))
            raise ScenarioError(f"--resume: {field} differs from {run_dir / 'config.yaml'}; resume with the same "
                                "scenario and overrides, or start a new run without --resume")
    return _execute(scenario, args.address, run_dir, profile=args.profile_startup)


def _resume(args: argparse.Namespace) -> int:
    return _execute(_resumable(args.run_dir, "resume"), args.address, args.run_dir)


def _resumable(run_dir: Path, what: str) -> Scenario:
    """The scenario of an unfinished run folder."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ScenarioError(f"{what}: {run_dir} holds no run (config.yaml is missing); give the run folder, "
                            "e.g. results/quickstart")
    if (run_dir / "summary.json").is_file():
        raise ScenarioError(f"{what}: the run in {run_dir} already finished (summary.json exists); nothing to resume")
    return load_and_validate(config)


def _execute(scenario: Scenario, address: str | None, run_dir: Path | None, profile: bool = False) -> int:
    from raysim.engine.runner import Interrupted, execute

    try:
        result = execute(scenario, address=address, resume=run_dir)
    except Interrupted as stop:
        print(f"raysim: {stop}", file=sys.stderr)
        return 128 + stop.signum
    if profile:
        print(result.startup.format(), file=sys.stderr)
    final = result.summary["final"]
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in final.items() if k in ("accuracy", "loss", "round")}
    print(f"raysim: {scenario.name} finished in {result.summary['wall_seconds']:.1f}s: {json.dumps(shown)}; results in {result.run_dir}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from raysim.sweep import is_study_file, load_study, plan

    if is_study_file(args.scenario):
        runs = plan(load_study(args.scenario, args.overrides))
        print(f"raysim: {args.scenario} is a valid study of {len(runs)} runs")
        return 0
    scenario = load_and_validate(args.scenario, args.overrides)
    if args.print:
        print(scenario_to_yaml(scenario), end="")
    print(f"raysim: {args.scenario} is a valid scenario ({scenario.name})")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from raysim.sweep import load_study, plan, run_study

    study = load_study(args.study, args.overrides)
    runs = plan(study)
    if args.dry_run:
        for planned in runs:
            print(planned.scenario.name)
        print(f"raysim: {args.study} is a valid study of {len(runs)} runs; results would go to {study.folder}")
        return 0
    rows = run_study(study, runs, address=args.address)
    failed = sum(row["status"] != "ok" for row in rows)
    print(f"raysim: study {study.name}: {len(rows) - failed} of {len(rows)} runs finished; table in {study.folder / 'study.md'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from raysim.report import write_report

    out = args.out or (args.runs[0] / "plots" if len(args.runs) == 1 else Path("report"))
    written = write_report(args.runs, out, note=lambda line: print(line, file=sys.stderr))
    print(f"raysim: wrote {len(written)} plots to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``raysim`` command."""
    args = _parser().parse_args(argv)
    try:
        return {"run": _run, "resume": _resume, "validate": _validate, "sweep": _sweep, "report": _report,
                "attack": _attack}[args.command](args)
    except ScenarioError as err:
        print(f"raysim: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("raysim: interrupted; finished rounds are in metrics.jsonl", file=sys.stderr)
        return 130


def entry() -> NoReturn:
    """The ``raysim`` command (and ``python -m raysim.cli``): ``main``, then the process ends without the
    interpreter's module-by-module teardown of torch, Ray, gRPC and pydantic (0.2 s a run on 2 cores,
    ``scripts/bench_startup.py``). Nothing is left to it: the run folder's writes are atomic and done, a
    session has shut its Ray down, and what a normal exit runs still runs first (the threads that keep it
    alive are joined, and the ``atexit`` handlers, W&B's and logging's among them, are called)."""
    code = main()
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (``raysim run ... | head``) or a closed stream
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
