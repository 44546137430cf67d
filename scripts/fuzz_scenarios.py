"""Fuzz the scenario loader and the data readers through the real command line (issue 9).

    python scripts/fuzz_scenarios.py --cases 1000 --seed 0

Runs ``--cases`` generated malformed scenarios (cycling through every category) plus every malformed
data file case, in process, and prints the totals: ``fuzz_cases``, ``fuzz_escaped``, per-category
counts of rejected / accepted / escaped cases, examples of escapes and of accepted mutations, and
last ``fuzz_ok: true|false`` (true when nothing escaped).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ["WANDB_MODE"] = "disabled"

from raysim.fuzz import TIME_BOUND_S, data_cases, run_case, scenario_cases, tally, warm_up  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000, help="generated scenario cases (data cases come on top)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-data", action="store_true", help="skip the data file cases")
    parser.add_argument("--time-bound", type=float, default=TIME_BOUND_S, help="seconds a case may take")
    parser.add_argument("--examples", type=int, default=20, help="escapes and accepted cases to print")
    args = parser.parse_args(argv)

    folder = ROOT / "scenarios"
    started = time.perf_counter()
    warm_up(folder)
    cases = scenario_cases(args.cases, args.seed, folder) + ([] if args.no_data else data_cases(args.seed))
    with tempfile.TemporaryDirectory(prefix="raysim-fuzz-") as workdir:
        outcomes = [run_case(case, workdir, time_bound_s=args.time_bound) for case in cases]
    escaped = [o for o in outcomes if o.verdict == "escaped"]
    accepted = [o for o in outcomes if o.verdict == "accepted"]

    print(f"fuzz_seed: {args.seed}")
    print(f"fuzz_cases: {len(outcomes)}")
    print(f"fuzz_escaped: {len(escaped)}")
    print(f"fuzz_accepted: {len(accepted)}")
    print(f"fuzz_slowest_case_s: {max(o.seconds for o in outcomes):.2f}")
    print(f"fuzz_wall_s: {time.perf_counter() - started:.1f}")
    print(f"{'category':<18} {'cases':>6} {'rejected':>9} {'accepted':>9} {'escaped':>8}")
    for category, counts in tally(outcomes).items():
        print(f"{category:<18} {sum(counts.values()):>6} {counts['rejected']:>9} {counts['accepted']:>9} "
              f"{counts['escaped']:>8}")
    for title, shown in (("escapes", escaped), ("accepted (valid mutations)", accepted)):
        if shown:
            print(f"{title}:")
        for outcome in shown[: args.examples]:
            print(f"  [{outcome.case.category}] {outcome.case.description[:110]}: {outcome.reason[:220]}")
    print(f"fuzz_ok: {'true' if not escaped else 'false'}")
    return 0 if not escaped else 1


if __name__ == "__main__":
    sys.exit(main())
