"""`bench.py http`: the HTTP API under wrk, each route against the floor it stands on.

    .venv/bin/python scripts/bench.py http [--duration 5] [--rounds 3] [--connections 32] [--big 100000]
    .venv/bin/python scripts/bench.py http --backend postgres

- POST /tasks (durable, 201) through `mission-control serve` (one process) vs a bare Starlette
  endpoint that answers a constant 201, under uvicorn in a process of its own. Target >= 0.6.
- GET /tasks/{id} the same way against a constant 200. Target >= 0.7.
- GET /overview on a log of 1,000 tasks and on one of 100,000: the rates within 10%.

Beside each route, the same bare Starlette doing only the storage work the route cannot skip
(one durable append; one keyed read), so the figures say where a route's time goes; and the
naive peer a user would write on the same stack (aiosqlite, one INSERT and COMMIT per POST, one
SELECT per GET, no auth or events): issue 16's target is >= 1.0 against it on both routes.

Both servers run the same uvicorn (uvloop, httptools when installed) on 127.0.0.1 and face the
same wrk, in the same run, in alternating rounds (the best of each kept, so a noisy neighbour on
a shared machine disturbs the comparison less). wrk comes from Debian's packages and is installed
if missing. Every step is bounded in time: wrk by --duration, each server start and fill by a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import re
import shutil
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import psycopg

from events import types as t
from tests.server import API, Server, Uvicorn, cli

from . import common, raw_postgres
from .common import command, fill_log, target, workdir

START_TIMEOUT = 60.0

LOAD_ARGUMENTS = (  # what `Load` reads
    (("--duration",), {"type": int, "default": 5, "help": "seconds of load per wrk run (default 5)"}),
    (("--rounds",), {"type": int, "default": 3, "help": "alternating rounds per comparison, best kept (default 3)"}),
    (("--connections",), {"type": int, "default": 32, "help": "wrk connections (default 32)"}),
    (("--threads",), {"type": int, "default": 1, "help": "wrk threads (default 1: the machine may have 2 cores)"}),
)

HTTP_ARGUMENTS = (
    *LOAD_ARGUMENTS,
    (("--backend",), {"choices": ("sqlite", "postgres"), "default": "sqlite",
                      "help": "sqlite (default: every route, against the aiosqlite peer), or postgres (POST and GET "
                              "on a database of its own, against a naive asyncpg peer on another)"}),
    (("--small",), {"type": int, "default": 1_000, "help": "tasks in the small log for /overview (default 1,000)"}),
    (("--big",), {"type": int, "default": 100_000, "help": "tasks in the big log for /overview (default 100,000)"}),
    (("--dir",), {"type": Path, "help": "where to put the data dirs (default: a temporary dir)"}),
)

# What the bare server answers: a task as `POST /tasks` would, so both send bodies of a like size.
CONSTANT_TASK = (
    b'{"id":"00000000-0000-4000-8000-000000000000","type":"prompt","content":"bench","title":null,'
    b'"description":null,"status":"pending","projectId":"00000000-0000-4000-8000-000000000001",'
    b'"desktopId":null,"agentId":null,"requiresApproval":false,"priority":5,"timeoutSeconds":null,'
    b'"metadata":{},"dependsOn":[],"webhookUrl":null,"createdBy":"admin","createdAt":"2026-01-01T00:00:00Z",'
    b'"startedAt":null,"completedAt":null,"archived":false,"version":1,"runs":0,"result":null,"error":null,'
    b'"watchers":[]}'
)


BARE_APP = f"""
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

BODY = {CONSTANT_TASK!r}


async def created(request):
    return Response(BODY, 201, media_type="application/json")


async def ok(request):
    return Response(BODY, 200, media_type="application/json")


app = Starlette(routes=[
    Route("{API}/tasks", created, methods=["POST"]),
    Route("{API}/tasks/{{task_id}}", ok, methods=["GET"]),
])
"""
"""The floor: Starlette routing under uvicorn, nothing of Mission Control."""


def storage_app(log_path: Path) -> str:
    """Storage alone: the same Starlette doing only the durable append (no read models) or the
    one keyed read a route needs. Not a target: it shows how much of a route's cost storage leaves."""
    return BARE_APP + f"""
import contextlib, uuid
from events import NO_STREAM, open_log
from events.types import TaskCreated


@contextlib.asynccontextmanager
async def lifespan(app):
    app.state.log = open_log({str(log_path)!r})
    await app.state.log.open()
    yield
    await app.state.log.close()


async def append_one(request):
    await request.body()
    task_id = str(uuid.uuid4())
    event = TaskCreated(task_id=task_id, type="prompt", content="bench", project_id=task_id, created_by="bench")
    await request.app.state.log.append("task-" + task_id, [event], expected=NO_STREAM)
    return Response(BODY, 201, media_type="application/json")


async def read_one(request):  # a row found by its key: the task stream's newest event
    last = await request.app.state.log.last_event("task-" + request.path_params["task_id"])
    return Response(bytes(last.payload) if last else BODY, 200, media_type="application/json")


app = Starlette(lifespan=lifespan, routes=[
    Route("{API}/tasks", append_one, methods=["POST"]),
    Route("{API}/tasks/{{task_id}}", read_one, methods=["GET"]),
])
"""


def naive_peer_app(db_path: Path) -> str:
    """What a user would write themselves on the same stack (issue 16's peer): Starlette and
    aiosqlite, WAL with synchronous=FULL, one INSERT and COMMIT per POST, one SELECT by id per GET;
    no auth, no events, no read models."""
    return f"""
import contextlib, json, uuid
import aiosqlite
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


@contextlib.asynccontextmanager
async def lifespan(app):
    app.state.db = await aiosqlite.connect({str(db_path)!r})
    await app.state.db.execute("PRAGMA journal_mode = WAL")
    await app.state.db.execute("PRAGMA synchronous = FULL")
    await app.state.db.execute("CREATE TABLE IF NOT EXISTS tasks (id TEXT PRIMARY KEY, body TEXT NOT NULL)")
    yield
    await app.state.db.close()


async def create(request):
    task = {{**json.loads(await request.body()), "id": str(uuid.uuid4()), "status": "pending"}}
    await request.app.state.db.execute("INSERT INTO tasks VALUES (?, ?)", (task["id"], json.dumps(task)))
    await request.app.state.db.commit()
    return JSONResponse(task, 201)


async def read(request):
    async with request.app.state.db.execute("SELECT body FROM tasks WHERE id = ?", (request.path_params["task_id"],)) as rows:
        row = await rows.fetchone()
    return Response(row[0], 200, media_type="application/json") if row else JSONResponse({{}}, 404)


app = Starlette(lifespan=lifespan, routes=[
    Route("{API}/tasks", create, methods=["POST"]),
    Route("{API}/tasks/{{task_id}}", read, methods=["GET"]),
])
"""


def naive_asyncpg_peer_app(url: str) -> str:
    """The naive peer on PostgreSQL, written the same way: Starlette and an asyncpg pool, one
    INSERT per POST (autocommit: durable once answered, as synchronous_commit is on), one SELECT
    by id per GET; no auth, no events, no read models."""
    return f"""
import contextlib, json, uuid
import asyncpg
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


@contextlib.asynccontextmanager
async def lifespan(app):
    app.state.pool = await asyncpg.create_pool({url!r})
    await app.state.pool.execute("CREATE TABLE IF NOT EXISTS naive_tasks (id uuid PRIMARY KEY, body text NOT NULL)")
    yield
    await app.state.pool.close()


async def create(request):
    task = {{**json.loads(await request.body()), "id": str(uuid.uuid4()), "status": "pending"}}
    await request.app.state.pool.execute("INSERT INTO naive_tasks VALUES ($1, $2)", uuid.UUID(task["id"]), json.dumps(task))
    return JSONResponse(task, 201)


async def read(request):
    body = await request.app.state.pool.fetchval(
        "SELECT body FROM naive_tasks WHERE id = $1", uuid.UUID(request.path_params["task_id"]))
    return Response(body, 200, media_type="application/json") if body else JSONResponse({{}}, 404)


app = Starlette(lifespan=lifespan, routes=[
    Route("{API}/tasks", create, methods=["POST"]),
    Route("{API}/tasks/{{task_id}}", read, methods=["GET"]),
])
"""


# --- processes ----------------------------------------------------------------------------


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    print("wrk is missing: installing Debian's package (apt-get update && apt-get install -y wrk)")
    subprocess.run("apt-get update && apt-get install -y wrk", shell=True, check=True, timeout=600,
                   stdout=subprocess.DEVNULL)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk could not be installed")
    return found


UNLIMITED = {"MC_RATE_LIMIT_PER_SECOND": "1000000000", "MC_RATE_LIMIT_BURST": "1000000000"}
"""The per-key rate limit would answer most of the load 429: it is not what is measured here."""


@contextlib.contextmanager
def mission_control(data_dir: Path, database: str | None = None) -> Iterator[tuple[str, str]]:
    """`mission-control serve` on loopback, on the data dir's SQLite file or on `database`:
    (base url, admin token)."""
    env = UNLIMITED if database is None else {**UNLIMITED, "MC_DATABASE_URL": database}
    with Server(data_dir, env).start(START_TIMEOUT) as server:
        yield server.base_url, server.admin_token


@contextlib.contextmanager
def bare_server(where: Path, name: str = "bare_floor", source: str = BARE_APP) -> Iterator[str]:
    (where / f"{name}.py").write_text(source)
    with Uvicorn(f"{name}:app", where, where, f"{API}/tasks/{uuid.uuid4()}").start(START_TIMEOUT) as bare:
        yield bare.base_url


# --- wrk --------------------------------------------------------------------------------------


class Load:
    def __init__(self, wrk: str, args: argparse.Namespace, where: Path):
        self.wrk, self.args, self.where = wrk, args, where

    def run(self, url: str, token: str | None = None, body: bytes | None = None,
            paths: tuple[str, ...] = ()) -> tuple[float, int, int]:
        """(requests per second, requests, non-2xx answers) of one wrk run; with `paths`, each
        request asks for one of them at random."""
        script = self.where / f"wrk-{uuid.uuid4().hex}.lua"
        lines = ['wrk.headers["Content-Type"] = "application/json"']
        if token:
            lines.append(f'wrk.headers["Authorization"] = "Bearer {token}"')
        if body is not None:
            lines += ['wrk.method = "POST"', f"wrk.body = [[{body.decode()}]]"]
        if paths:
            lines += ["local paths = {" + ",".join(f'"{path}"' for path in paths) + "}",
                      "request = function() return wrk.format(nil, paths[math.random(#paths)]) end"]
        script.write_text("\n".join(lines) + "\n")
        args = self.args
        command = [self.wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s",
                   "--timeout", "10s", "-s", str(script), url]
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.duration + 60, check=True)
        out = done.stdout
        found = re.search(r"Requests/sec:\s+([\d.]+)", out)
        total = re.search(r"(\d+) requests in", out)
        if not found or not total:
            raise SystemExit(f"could not read wrk's output:\n{out}\n{done.stderr}")
        bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
        errors = re.search(r"Socket errors:.*", out)
        if errors:
            print(f"    wrk: {errors.group(0)}")
        return float(found.group(1)), int(total.group(1)), int(bad.group(1)) if bad else 0


line = functools.partial(common.line, widths=(40, 14))


class Target(NamedTuple):
    label: str
    url: str
    token: str | None = None
    body: bytes | None = None
    paths: tuple[str, ...] = ()


def compare(load: Load, targets: list[Target], rounds: int, answered: list[int] | None = None) -> list[float]:
    """Each target under the same load, alternating for `rounds` rounds; the best rate of each
    (the one least disturbed by whatever else the machine runs), and any non-2xx answer shown.
    `answered` receives how many answers each target gave in all."""
    best = [(0.0, 0, 0)] * len(targets)
    bad = [0] * len(targets)
    total = [0] * len(targets)
    for _ in range(rounds):
        for n, target in enumerate(targets):
            measured = load.run(target.url, target.token, target.body, target.paths)
            bad[n] += measured[2]
            total[n] += measured[1]
            best[n] = max(best[n], measured)
    if answered is not None:
        answered[:] = total
    rates = []
    for target, (per_second, total, _), failed in zip(targets, best, bad):
        note = f"(best of {rounds}: {total:,} requests" + (f"; {failed:,} answers NOT 2xx)" if failed else ")")
        line(target.label, f"{per_second:,.0f} req/s", note)
        rates.append(0.0 if failed else per_second)
    return rates


def verdict(label: str, value: float, met: bool, wanted: str) -> None:
    line(label, f"{value:.3f}", f"({target(wanted, met)})")


def share(part: float, whole: float) -> float:
    """part / whole; nan (never met, printed as such) when a run answered nothing, as a
    stalled machine can make a short run do."""
    return part / whole if whole else float("nan")


def storage_share(stored: float, floor: float, served: float) -> None:
    """Where the time goes: storage alone against the bare floor, and the route against storage alone."""
    line("  storage alone against bare", f"{share(stored, floor):.3f}")
    line("  the route against storage alone", f"{share(served, stored):.3f}")


MANY = 1_000
"""Tasks that `GET /tasks/{id}` asks for at random in its second comparison."""


def ours_to_read(client: httpx.Client) -> list[str]:
    """`MANY` of the tasks the POST comparison made, by their ids."""
    ids: list[str] = []
    while len(ids) < MANY:
        page = client.get("/tasks", params={"limit": 500, "offset": len(ids)}).json()
        if not page:
            break
        ids += [task["id"] for task in page]
    return ids[:MANY]


def many_tasks(load: Load, args: argparse.Namespace, ours: tuple[str, str, list[str]],
               theirs: tuple[str, list[str]]) -> None:
    """GET /tasks/{id} of one of a thousand tasks at random: the cache and a backend's gathering
    of reads (PostgreSQL) meet as many different rows as requests."""
    (url, token, our_ids), (naive, peer_ids) = ours, theirs
    print(f"GET /tasks/{{id}} of {len(our_ids):,} tasks at random")
    served, peer = compare(load, [
        Target("mission-control serve (200)", url, token, paths=tuple(f"{API}/tasks/{i}" for i in our_ids)),
        Target("the naive peer (SELECT by id)", naive, paths=tuple(f"{API}/tasks/{i}" for i in peer_ids)),
    ], args.rounds)
    verdict("against the naive peer", share(served, peer), share(served, peer) >= 1.0, ">= 1.0")


PROJECTS = 500
"""Projects on the server when a member's key reads a task (`as_a_member`)."""


def as_a_member(load: Load, args: argparse.Namespace, data_dir: Path, admin: httpx.Client,
                theirs: tuple[str, str], database: str | None = None) -> None:
    """GET /tasks/{id} with the key of a user who is no admin, a member of one project in 50
    of `PROJECTS`: the server checks that the task's project is one of the user's."""
    naive, peer_id = theirs
    mine = admin.post("/projects", json={"name": "mine", "members": ["member"]}).json()["id"]
    for n in range(PROJECTS - 1):
        members = [f"user-{n}", "member"] if n % 50 == 0 else [f"user-{n}"]
        admin.post("/projects", json={"name": f"project {n}", "members": members}).raise_for_status()
    token = cli(data_dir, "token", "create", "--user", "member", "--scopes", "task:read,task:write",
                env={"MC_DATABASE_URL": database} if database else None).stdout.strip().splitlines()[-1]
    base = str(admin.base_url).rstrip("/")  # the API's root
    task = httpx.post(base + "/tasks", json={"type": "prompt", "content": "mine", "projectId": mine},
                      headers={"Authorization": f"Bearer {token}"})
    task.raise_for_status()
    print(f"GET /tasks/{{id}} with a project member's key, {PROJECTS:,} projects")
    served, peer = compare(load, [
        Target("mission-control serve (200)", f"{base}/tasks/{task.json()['id']}", token),
        Target("the naive peer (SELECT by id)", f"{naive}{API}/tasks/{peer_id}"),
    ], args.rounds)
    verdict("against the naive peer", share(served, peer), share(served, peer) >= 1.0, ">= 1.0")


# --- filling a log fast -------------------------------------------------------------------------


def overview_appends(tasks: int) -> Iterator[tuple[str, list]]:
    """A project and `tasks` tasks in it; a third of them run to done, so counters vary."""
    project_id = str(uuid.uuid4())
    yield f"project-{project_id}", [t.ProjectCreated(project_id=project_id, name="bench")]
    for n in range(tasks):
        task_id = str(uuid.uuid4())
        created = t.TaskCreated(task_id=task_id, type="prompt", content=f"task {n}", project_id=project_id,
                                created_by="bench", desktop_id=f"desk-{n % 7}")
        if n % 3:
            yield f"task-{task_id}", [created]
        else:
            run_id = str(uuid.uuid4())
            yield f"task-{task_id}", [created, t.TaskStarted(task_id=task_id, run_id=run_id, agent_id="bench"),
                                      t.TaskCompleted(task_id=task_id, run_id=run_id, result="ok")]


def fill(data_dir: Path, tasks: int) -> float:
    started = time.perf_counter()
    asyncio.run(fill_log(data_dir / "mission-control.db", overview_appends(tasks)))
    return time.perf_counter() - started


# --- the benchmark ------------------------------------------------------------------------------


@command(
    "http", "POST /tasks, GET /tasks/{id}, GET /overview through `mission-control serve` vs bare Starlette, under wrk",
    *HTTP_ARGUMENTS,
)
def bench_http(args: argparse.Namespace) -> None:
    wrk = ensure_wrk()
    if args.backend == "postgres":
        return bench_http_postgres(wrk, args)
    print(f"http: wrk -t{args.threads} -c{args.connections} -d{args.duration}s, best of {args.rounds} alternating "
          f"rounds, on 127.0.0.1; {os.cpu_count()} CPUs; `mission-control serve` is one process, durable "
          "(synchronous=FULL)")
    body = b'{"type": "prompt", "content": "benchmark task", "priority": 5}'
    with workdir(args.dir) as where:
        load = Load(wrk, args, where)
        with (mission_control(where / "api") as (url, token), bare_server(where) as bare,
              bare_server(where, "storage_floor", storage_app(where / "storage-floor.db")) as storage,
              bare_server(where, "naive_peer", naive_peer_app(where / "naive-peer.db")) as naive):
            client = httpx.Client(base_url=url + API, headers={"Authorization": f"Bearer {token}"})
            before = client.get("/overview").json()["tasks"]["pending"]

            print("POST /tasks")
            answered: list[int] = []
            served, floor, stored, peer = compare(load, [
                Target("mission-control serve (201, durable)", f"{url}{API}/tasks", token, body),
                Target("bare Starlette (constant 201)", f"{bare}{API}/tasks", None, body),
                Target("bare Starlette + one durable append", f"{storage}{API}/tasks", None, body),
                Target("the naive peer (INSERT + COMMIT)", f"{naive}{API}/tasks", None, body),
            ], args.rounds, answered)
            created = client.get("/overview").json()["tasks"]["pending"] - before
            # wrk counts the answers it read; requests still in flight when a run stops may be appended too
            assert created >= answered[0], f"{answered[0]:,} tasks answered 201 but {created:,} in the log"
            line("tasks in the log afterwards", f"{created:,}", f"(>= the {answered[0]:,} answered 201)")
            verdict("ratio", share(served, floor), share(served, floor) >= 0.6, ">= 0.6")
            storage_share(stored, floor, served)
            verdict("against the naive peer", share(served, peer), share(served, peer) >= 1.0, ">= 1.0")

            print("GET /tasks/{id}")
            peer_id = httpx.post(f"{naive}{API}/tasks", content=body).json()["id"]
            task_id = client.post("/tasks", json={"type": "prompt", "content": "read me"}).json()["id"]
            served, floor, stored, peer = compare(load, [
                Target("mission-control serve (200)", f"{url}{API}/tasks/{task_id}", token),
                Target("bare Starlette (constant 200)", f"{bare}{API}/tasks/{task_id}"),
                Target("bare Starlette + one keyed read", f"{storage}{API}/tasks/{task_id}"),
                Target("the naive peer (SELECT by id)", f"{naive}{API}/tasks/{peer_id}"),
            ], args.rounds)
            verdict("ratio", share(served, floor), share(served, floor) >= 0.7, ">= 0.7")
            storage_share(stored, floor, served)
            verdict("against the naive peer", share(served, peer), share(served, peer) >= 1.0, ">= 1.0")
            with sqlite3.connect(where / "naive-peer.db") as db:
                peer_ids = [row[0] for row in db.execute("SELECT id FROM tasks LIMIT ?", (MANY,))]
            many_tasks(load, args, (url, token, ours_to_read(client)), (naive, peer_ids))
            as_a_member(load, args, where / "api", client, (naive, peer_id))
            client.close()

        print("GET /overview")
        for size in (args.small, args.big):
            seconds = fill(where / f"overview-{size}", size)
            line(f"filled {size:,} tasks", f"{seconds:.1f} s", "(log API, projected in the same transactions)")
        with contextlib.ExitStack() as servers:
            targets = []
            for size in (args.small, args.big):
                url, token = servers.enter_context(mission_control(where / f"overview-{size}"))
                counts = httpx.get(f"{url}{API}/overview", headers={"Authorization": f"Bearer {token}"}).json()
                assert sum(counts["tasks"].values()) == size, counts
                targets.append(Target(f"at {size:,} tasks", f"{url}{API}/overview", token))
            small, big = compare(load, targets, args.rounds)
        spread = share(abs(big - small), max(small, big))
        verdict(f"difference {args.small:,} vs {args.big:,}", spread, spread <= 0.10, "<= 0.10")


def bench_http_postgres(wrk: str, args: argparse.Namespace) -> None:
    """POST /tasks and GET /tasks/{id} with the log on PostgreSQL, one node, against the naive
    asyncpg peer, each on a fresh database of its own on the same server."""
    body = b'{"type": "prompt", "content": "benchmark task", "priority": 5}'
    with (workdir(args.dir) as where, raw_postgres.fresh_database() as ours, raw_postgres.fresh_database() as theirs):
        print(f"http --backend postgres: wrk -t{args.threads} -c{args.connections} -d{args.duration}s, best of "
              f"{args.rounds} alternating rounds; {os.cpu_count()} CPUs; one `mission-control serve` node; "
              f"{raw_postgres.describe(ours)}")
        load = Load(wrk, args, where)
        with (mission_control(where / "api", ours) as (url, token),
              bare_server(where, "naive_asyncpg", naive_asyncpg_peer_app(theirs)) as naive):
            print("POST /tasks")
            served, peer = compare(load, [
                Target("mission-control serve (201, durable)", f"{url}{API}/tasks", token, body),
                Target("the naive asyncpg peer (INSERT)", f"{naive}{API}/tasks", None, body),
            ], args.rounds)
            verdict("against the naive peer", share(served, peer), share(served, peer) >= 1.0, ">= 1.0")
            print("GET /tasks/{id}")
            peer_id = httpx.post(f"{naive}{API}/tasks", content=body).json()["id"]
            task_id = httpx.post(f"{url}{API}/tasks", content=body, headers={
                "Authorization": f"Bearer {token}", "Content-Type": "application/json"}).json()["id"]
            served, peer = compare(load, [
                Target("mission-control serve (200)", f"{url}{API}/tasks/{task_id}", token),
                Target("the naive asyncpg peer (SELECT by id)", f"{naive}{API}/tasks/{peer_id}"),
            ], args.rounds)
            verdict("against the naive peer", share(served, peer), share(served, peer) >= 1.0, ">= 1.0")
            with psycopg.connect(theirs) as db:
                peer_ids = [str(row[0]) for row in db.execute("SELECT id FROM naive_tasks LIMIT %s", (MANY,))]
            with httpx.Client(base_url=url + API, headers={"Authorization": f"Bearer {token}"}) as client:
                many_tasks(load, args, (url, token, ours_to_read(client)), (naive, peer_ids))
                as_a_member(load, args, where / "api", client, (naive, peer_id), ours)
