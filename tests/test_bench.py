"""`scripts/bench.py` keeps working: each benchmark, at a tiny size, runs to the end and prints
its comparison. (A change to the API once broke one that nobody ran for a session.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_postgres

pytestmark = pytest.mark.sqlite_file

ROOT = Path(__file__).resolve().parent.parent

TINY = {  # a run's id: its subcommand, arguments ("{dir}" is the test's own directory), and the line it prints last
    "append": ("append", ["--events", "2000", "--appenders", "50", "--alone", "20", "--dir", "{dir}"],
               "one appender awaiting each append"),
    "append-postgres": ("append", ["--events", "2000", "--appenders", "50", "--alone", "20", "--backend", "postgres",
                                   "--dir", "{dir}"], "PostgreSQL against SQLite"),
    "replay": ("replay", ["--events", "3000", "--dir", "{dir}"], "peak growth"),
    "verify": ("verify", ["--events", "3000", "--dir", "{dir}"], "rebuild (drop + refold)"),
    "run": ("run", ["--tasks", "20"], "run -> done latency p99"),
    "notify": ("notify", ["--tasks", "20"], "ratio notification / webhook p50"),
    "queue": ("queue", ["--runs", "20", "--limit", "2"], "slot-free -> next-start p99"),
    "sse": ("sse", ["--subscribers", "20", "--seconds", "0.5", "--catchup", "2000"], "events lost (mission-control)"),
    "sse-2-nodes-postgres": ("sse", ["--subscribers", "20", "--seconds", "0.5", "--catchup", "0", "--nodes", "2",
                                     "--backend", "postgres"], "events lost (mission-control)"),
    "desktops": ("desktops", ["--runs", "20", "--lines", "50", "--idle-workers", "2", "--idle-seconds", "1"],
                 "log events per hour per idle worker"),
    "processes": ("processes", ["--duration", "1", "--rounds", "1", "--dir", "{dir}"], "CPU seconds of each process"),
    "http": ("http", ["--duration", "1", "--rounds", "1", "--small", "50", "--big", "200", "--dir", "{dir}"],
             "difference 50 vs 200"),
    "artifacts": ("artifacts", ["--mib", "2", "--dir", "{dir}"], "download (GET, streamed)"),
    "http-postgres": ("http", ["--duration", "1", "--rounds", "1", "--backend", "postgres", "--dir", "{dir}"],
                      "the naive asyncpg peer (SELECT by id)"),
    "http-nodes": ("http-nodes", ["--duration", "1", "--rounds", "1", "--dir", "{dir}"], "2 nodes against 1 (GET)"),
}

ON_POSTGRES = {"append-postgres", "sse-2-nodes-postgres", "http-nodes", "http-postgres"}


@pytest.mark.parametrize("run", sorted(TINY))
def test_each_benchmark_runs_to_its_last_figure(run, tmp_path):
    if run in ON_POSTGRES:
        require_postgres()
    command, arguments, last_figure = TINY[run]
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
    assert sorted(listed) == sorted({command for command, _, _ in TINY.values()})
