"""The scripts' shared helpers (scripts/rss.py, scripts/studylib.py), without Ray."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from rss import MemorySampler, Usage, measure  # noqa: E402
from studylib import mean_std, reading_marker, saved_results, study_parser, write_report  # noqa: E402


def test_the_sampler_keeps_the_peak_and_hands_on_every_sample():
    values = iter([Usage(5, 1), Usage(9, 0), Usage(2, 7)])
    seen: list[Usage] = []
    with MemorySampler(lambda: next(values, Usage()), interval=0.01, on_sample=seen.append) as sampler:
        time.sleep(0.2)
    assert seen[:3] == [Usage(5, 1), Usage(9, 0), Usage(2, 7)]
    assert sampler.peak == Usage(9, 7)


def test_measure_sums_processes_and_skips_one_that_is_gone():
    child = subprocess.Popen([sys.executable, "-c", ""])
    gone = psutil.Process(child.pid)
    child.wait()
    me = psutil.Process()
    usage = measure([me, gone], pss=True)
    assert usage.rss > 0 and usage.pss > 0
    assert measure([gone]) == Usage()


def test_a_report_keeps_the_hand_written_reading_below_its_marker(tmp_path):
    path = tmp_path / "study.md"
    write_report(path, "# First\n\ntable 1", "scripts/study_x.py")
    marker = reading_marker("study_x.py")
    assert path.read_text() == f"# First\n\ntable 1\n\n{marker}\n"
    path.write_text(path.read_text() + "Read by hand.\n")
    write_report(path, "# Second\n\ntable 2", "study_x.py")
    assert path.read_text() == f"# Second\n\ntable 2\n\n{marker}\nRead by hand.\n"


def test_the_parser_and_the_statistics():
    args = study_parser("A study.\n\nMore.", replot="x.json").parse_args(["--replot"])
    assert args.replot and args.out == Path("docs/studies")
    assert mean_std([1.0, 3.0]) == (2.0, 2.0 ** 0.5) and mean_std([4.0]) == (4.0, 0.0)


def test_saved_results_run_and_save_then_replot_reads_without_running(tmp_path):
    parser = study_parser("A study.", replot="x.json")
    runs = []
    first = saved_results(parser.parse_args(["--out", str(tmp_path / "out")]), lambda: runs.append(1) or {"rows": [1, 2]})
    again = saved_results(parser.parse_args(["--out", str(tmp_path / "out"), "--replot"]), lambda: runs.append(1) or {})
    assert first == again == {"rows": [1, 2]} and runs == [1]
    assert json.loads((tmp_path / "out" / "x.json").read_text()) == {"rows": [1, 2]}
