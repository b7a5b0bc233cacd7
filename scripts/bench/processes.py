"""`bench.py processes`: `serve --processes 2` against one `serve`, on SQLite, under wrk.

    .venv/bin/python scripts/bench.py processes [--processes 2] [--duration 5] [--rounds 3] [--connections 32]

- GET /tasks/{id}: the rate of N processes over one's. Target (issue 15) >= 1.5 with 2.
- POST /tasks (durable, 201): the same ratio, no target: every process appends to the one file,
  whose writes take one lock, so it shows what N processes cost or gain on writes.

Both servers run on fresh data dirs of their own, under the same wrk in alternating rounds (the
best of each kept), as `bench.py http` runs its comparisons; each process's CPU time is shown, so
that the figures say whether the load reached every process.
"""

from __future__ import annotations

import argparse
import os

import psutil

from tests.server import API, Server

from .common import command, cpu_seconds, line, workdir
from .http_api import (
    HTTP_ARGUMENTS, START_TIMEOUT, UNLIMITED, Load, Target, compare, ensure_wrk, share, verdict,
)

GET_TARGET = 1.5
BODY = b'{"type": "prompt", "content": "benchmark task", "priority": 5}'
OPTIONS = {"--duration", "--rounds", "--connections", "--threads", "--dir"}


@command(
    "processes", "GET /tasks/{id} and POST /tasks through `serve --processes N` vs one process, on SQLite, under wrk",
    (("--processes",), {"type": int, "default": 2, "help": "processes of the server measured (default 2)"}),
    *(argument for argument in HTTP_ARGUMENTS if argument[0][0] in OPTIONS),
)
def bench_processes(args: argparse.Namespace) -> None:
    wrk = ensure_wrk()
    n = args.processes
    print(f"processes: wrk -t{args.threads} -c{args.connections} -d{args.duration}s, best of {args.rounds} "
          f"alternating rounds, on 127.0.0.1; {os.cpu_count()} CPUs; `serve --processes {n}` vs `serve`, each on "
          "a SQLite data dir of its own, durable (synchronous=FULL)")
    with workdir(args.dir) as where:
        load = Load(wrk, args, where)
        with (Server(where / f"processes-{n}", {**UNLIMITED, "MC_PROCESSES": n}).start(START_TIMEOUT) as many,
              Server(where / "processes-1", UNLIMITED).start(START_TIMEOUT) as one):
            ids = [server.client().post("/tasks", json={"type": "prompt", "content": "read me"}).json()["id"]
                   for server in (many, one)]
            children = [child.pid for child in psutil.Process(many.process.pid).children()]
            before = [cpu_seconds(pid) for pid in children]

            print("GET /tasks/{id}")
            served_many, served_one = compare(load, [
                Target(f"serve --processes {n} (200)", f"{many.base_url}{API}/tasks/{ids[0]}", many.admin_token),
                Target("serve, one process (200)", f"{one.base_url}{API}/tasks/{ids[1]}", one.admin_token),
            ], args.rounds)
            ratio = share(served_many, served_one)
            verdict(f"ratio {n} processes / 1", ratio, ratio >= GET_TARGET, f">= {GET_TARGET}")

            print("POST /tasks")
            served_many, served_one = compare(load, [
                Target(f"serve --processes {n} (201, durable)", f"{many.base_url}{API}/tasks", many.admin_token, BODY),
                Target("serve, one process (201, durable)", f"{one.base_url}{API}/tasks", one.admin_token, BODY),
            ], args.rounds)
            line(f"ratio {n} processes / 1 (POST)", f"{share(served_many, served_one):.3f}",
                 "(no target: the processes append to one file, one writer at a time)")
            spent = [cpu_seconds(pid) - was for pid, was in zip(children, before)]
            line("CPU seconds of each process", " / ".join(f"{s:.1f}" for s in spent),
                 f"(of `serve --processes {n}`, under both loads)")
