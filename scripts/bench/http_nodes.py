"""`bench.py http-nodes`: POST /tasks and GET /tasks/{id} through one `mission-control serve`
node, then through two nodes on the same PostgreSQL database, under wrk.

    .venv/bin/python scripts/bench.py http-nodes [--duration 5] [--rounds 3] [--database URL]

One node alone (the second stopped, so nothing else follows the log), then both, each loaded
by a wrk of its own at the same time, in alternating rounds (the best of each kept); the two
rates are summed, and the figure is two nodes against one. Each node has a data dir and a desktop of its own (tests/server.py
`Nodes`), and no per-key rate limit. Everything runs on this machine, PostgreSQL and the wrks
included, so on a small machine the nodes share its cores: the ratio says what a second node
buys here, not on machines of their own. Every step is bounded: wrk by --duration, each start
by a deadline.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from tests.server import API, Nodes, Server

from .common import DIR_OPTION, command, database, database_options, workdir
from .http_api import LOAD_ARGUMENTS, Load, Target, ensure_wrk, line, share

BODY = b'{"type": "prompt", "content": "benchmark task", "priority": 5}'


class Measured(NamedTuple):
    rates: list[float]  # each node's, in the best round
    requests: int  # answered in all rounds
    bad: int  # of them, not 2xx


def at_once(load: Load, targets: list[Target]) -> list[tuple[float, int, int]]:
    """One round: every target under a wrk of its own at the same time."""
    with ThreadPoolExecutor(len(targets)) as pool:
        return list(pool.map(lambda target: load.run(target.url, target.token, target.body), targets))


def best(rounds: list[list[tuple[float, int, int]]]) -> Measured:
    """The round with the best summed rate (the one least disturbed by the rest of the machine)."""
    kept = max(rounds, key=lambda measured: sum(m[0] for m in measured))
    every = [m for measured in rounds for m in measured]
    return Measured([m[0] for m in kept], sum(m[1] for m in every), sum(m[2] for m in every))


def show(label: str, measured: Measured, rounds: int) -> float:
    """Prints the summed rate (0 when any answer was not 2xx) and returns it."""
    total = sum(measured.rates)
    parts = " + ".join(f"{r:,.0f}" for r in measured.rates)
    note = f"(best of {rounds}" + (f": {parts}" if len(measured.rates) > 1 else "") + f"; {measured.requests:,} requests"
    note += f"; {measured.bad:,} answers NOT 2xx)" if measured.bad else ")"
    line(label, f"{total:,.0f} req/s", note)
    return 0.0 if measured.bad else total


def pending(node: Server) -> int:
    return node.client().get("/overview").json()["tasks"]["pending"]


@command(
    "http-nodes", "POST /tasks and GET /tasks/{id} on 1 node vs 2 nodes on one PostgreSQL database, under wrk",
    *LOAD_ARGUMENTS,
    *database_options("postgres"),
    DIR_OPTION,
)
def bench_http_nodes(args: argparse.Namespace) -> None:
    wrk = ensure_wrk()
    rounds = args.rounds
    with workdir(args.dir) as where, database(args) as url, \
            Nodes(where, url, {"MC_RATE_LIMIT_PER_SECOND": 0}) as nodes:
        on = f"one PostgreSQL database ({url.rpartition('@')[2]})" if url else "one SQLite data dir"
        print(f"http-nodes: wrk -t{args.threads} -c{args.connections} -d{args.duration}s per node, best of {rounds} "
              f"rounds, on 127.0.0.1; {os.cpu_count()} CPUs; `mission-control serve` nodes on {on}, durable")
        load = Load(wrk, args, where)
        first = nodes.start(0)
        token = first.admin_token
        task_id = first.client().post("/tasks", json={"type": "prompt", "content": "read me"}).json()["id"]
        before = pending(first)

        def post(node: Server) -> Target:
            return Target("POST /tasks", f"{node.base_url}{API}/tasks", token, BODY)

        def get(node: Server) -> Target:
            return Target("GET /tasks/{id}", f"{node.base_url}{API}/tasks/{task_id}", token)

        # Alternating rounds, so that a noisy neighbour disturbs both alike; the second node is
        # stopped between them, so one node is one node alone, with nothing else following the log.
        one_post, one_get, two_post, two_get = [], [], [], []
        for _ in range(rounds):
            one_post.append(at_once(load, [post(first)]))
            one_get.append(at_once(load, [get(first)]))
            with nodes.start(1) as second:
                two_post.append(at_once(load, [post(first), post(second)]))
                two_get.append(at_once(load, [get(first), get(second)]))
        created = pending(first) - before
        one_post, one_get, two_post, two_get = map(best, (one_post, one_get, two_post, two_get))

    print("POST /tasks")
    single = show("1 node", one_post, rounds)
    double = show("2 nodes at once, summed", two_post, rounds)
    answered = one_post.requests - one_post.bad + two_post.requests - two_post.bad
    # wrk counts the answers it read; requests still in flight when a run stops may be appended too
    assert created >= answered, f"{answered:,} tasks answered 201 but {created:,} in the log"
    line("tasks in the log afterwards", f"{created:,}", f"(>= the {answered:,} answered 201)")
    line("2 nodes against 1", f"{share(double, single):.3f}")
    print("GET /tasks/{id}")
    single = show("1 node", one_get, rounds)
    double = show("2 nodes at once, summed", two_get, rounds)
    line("2 nodes against 1 (GET)", f"{share(double, single):.3f}")
