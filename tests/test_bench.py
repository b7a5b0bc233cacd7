"""`scripts/bench.py` keeps working: each benchmark, at a tiny size, runs to the end and prints
its comparison. (A change to the API once broke one that nobody ran for a session.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

TINY = {  # arguments ("{dir}" is the test's own directory), and the line the benchmark prints last
    "append": (["--events", "2000", "--appenders", "50", "--dir", "{dir}"], "raw, a transaction per 50 rows"),
    "replay": (["--events", "3000", "--dir", "{dir}"], "peak growth"),
    "verify": (["--events", "3000", "--dir", "{dir}"], "rebuild (drop + refold)"),
    "run": (["--tasks", "20"], "run -> done latency p99"),
    "queue": (["--runs", "20", "--limit", "2"], "slot-free -> next-start p99"),
    "sse": (["--subscribers", "20", "--seconds", "0.5", "--catchup", "2000"], "events lost (mission-control)"),
    "desktops": (["--runs", "20", "--lines", "50", "--idle-workers", "2", "--idle-seconds", "1"],
                 "log events per hour per idle worker"),
    "http": (["--duration", "1", "--rounds", "1", "--small", "50", "--big", "200", "--dir", "{dir}"], "difference 50 vs 200"),
}


@pytest.mark.parametrize("command", sorted(TINY))
def test_each_benchmark_runs_to_its_last_figure(command, tmp_path):
    arguments, last_figure = TINY[command]
    arguments = [a.replace("{dir}", str(tmp_path)) for a in arguments]
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), command, *arguments],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert last_figure in done.stdout, done.stdout[-3000:]


def test_the_package_runs_as_a_module_and_every_subcommand_is_run_above():
    done = subprocess.run([sys.executable, "-m", "scripts.bench", "--help"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    listed = done.stdout[done.stdout.index("{") + 1:done.stdout.index("}")].split(",")
    assert sorted(listed) == sorted(TINY)
