"""`serve --processes N` (issue 15): N processes on one port, each a node of the one log, on both
backends. Which process answered a connection is read from the kernel (psutil: the process that
holds the accepted socket), so the API tells nothing new for it."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import threading
import time

import httpx
import psutil
import pytest

from events import Meta
from service.cli import _with_log
from service.commands.desktops import Register
from service.commands.handling import Commands
from service.settings import from_env
from tests.api_helpers import UNLIMITED, wait_for
from tests.server import API, Server, cli, free_port

BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(params=BACKENDS)
def database_env(request) -> dict[str, str]:
    if request.param == "sqlite":
        return {}
    return {"MC_DATABASE_URL": request.getfixturevalue("postgres_database")}


@pytest.fixture
def two(tmp_path, database_env):
    """`serve --processes 2`, stopped at the end."""
    server = Server(tmp_path / "data", {**database_env, **UNLIMITED, "MC_PROCESSES": 2}).start()
    yield server
    server.stop()


def children(server: Server) -> list[psutil.Process]:
    return psutil.Process(server.process.pid).children()


class Connection:
    """One HTTP/1.1 keep-alive connection, and the process that accepted it."""

    def __init__(self, server: Server):
        self.server = server
        self.http = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        self.http.connect()
        mine = self.http.sock.getsockname()
        self.pid = wait_for(lambda: next((
            child.pid for child in children(server)
            if any(c.raddr and tuple(c.raddr) == mine for c in _connections(child))
        ), None), timeout=30, what=f"a process to accept the connection from port {mine[1]}")

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {self.server.admin_token}", "Content-Type": "application/json"}
        self.http.request(method, API + path, None if body is None else json.dumps(body), headers)
        answer = self.http.getresponse()
        return answer.status, json.loads(answer.read() or b"null")

    def close(self) -> None:
        self.http.close()


def _connections(process: psutil.Process) -> list:
    try:
        return process.net_connections(kind="tcp")
    except psutil.NoSuchProcess:  # exited meanwhile
        return []


def connection_to(server: Server, pid: int) -> Connection:
    """A fresh connection that process `pid` accepted (the kernel spreads them by a hash of the
    client's port: a few tries find it)."""
    for _ in range(200):
        connection = Connection(server)
        if connection.pid == pid:
            return connection
        connection.close()
    raise AssertionError(f"no connection of 200 reached process {pid}")


def test_both_processes_answer_and_what_one_acknowledged_the_other_reads_at_once(two):
    pids = {child.pid for child in children(two)}
    assert len(pids) == 2 and two.process.pid not in pids
    reached = set()
    for _ in range(64):  # fresh connections: each hashed to one of the two
        connection = Connection(two)
        assert connection.request("GET", "/overview")[0] == 200
        reached.add(connection.pid)
        connection.close()
    assert reached == pids

    first, second = (connection_to(two, pid) for pid in sorted(pids))
    for writer, reader in ((first, second), (second, first)):
        status, created = writer.request("POST", "/tasks", {"type": "prompt", "content": f"from {writer.pid}"})
        assert status == 201, created
        status, read = reader.request("GET", f"/tasks/{created['id']}")
        assert status == 200 and read["content"] == f"from {writer.pid}"
    desktops = {d["id"]: d["status"] for d in first.request("GET", "/desktops")[1]}
    assert desktops == {"local-1": "online", "local-2": "online"}  # a desktop of each process's own
    first.close()
    second.close()


def test_the_activity_stream_of_one_process_carries_what_another_appended(two):
    pids = sorted(child.pid for child in children(two))
    watcher, writer = connection_to(two, pids[0]), connection_to(two, pids[1])
    head = watcher.request("GET", "/events?limit=1")[1]["head"]
    watcher.http.request("GET", f"{API}/activity/stream?after={head}&types=task.created",
                         headers={"Authorization": f"Bearer {two.admin_token}"})
    stream = watcher.http.getresponse()
    assert stream.status == 200
    status, created = writer.request("POST", "/tasks", {"type": "prompt", "content": "streamed"})
    assert status == 201
    while not (line := stream.readline()).startswith(b"data:"):  # bounded by the connection's timeout
        assert line, "the stream ended"
    event = json.loads(line[5:])
    assert event["position"] > head and event["stream"] == f"task-{created['id']}"
    watcher.close()
    writer.close()


def test_a_process_killed_is_started_again_and_nothing_acknowledged_is_lost(two):
    acknowledged: list[str] = []
    stop = threading.Event()

    def write() -> None:  # fresh connections, so both processes take writes, before and after the kill
        while not stop.is_set():
            try:
                answer = httpx.post(f"{two.base_url}{API}/tasks", json={"type": "prompt", "content": "kept"},
                                    headers={"Authorization": f"Bearer {two.admin_token}"}, timeout=10)
            except httpx.HTTPError:  # a connection of the killed process: nothing it sent was acknowledged
                continue
            if answer.status_code == 201:
                acknowledged.append(answer.json()["id"])

    def started_again() -> int | None:
        now = [child.pid for child in children(two)]
        return next((pid for pid in now if pid not in before), None) if len(now) == 2 else None

    writers = [threading.Thread(target=write) for _ in range(4)]
    for writer in writers:
        writer.start()
    try:
        wait_for(lambda: len(acknowledged) >= 20, what="writes before the kill")
        before = {child.pid for child in children(two)}
        killed = min(before)
        os.kill(killed, signal.SIGKILL)
        new = wait_for(started_again, timeout=30, what="the parent to start the killed process again")
        restarted = connection_to(two, new)  # it serves: the connection waited on its socket meanwhile
        count = len(acknowledged)
        wait_for(lambda: len(acknowledged) >= count + 20, what="writes after the restart")
    finally:
        stop.set()
        for writer in writers:
            writer.join(30)
    assert f"(pid {killed}) was killed by signal 9; starting it again" in two.own_output()
    missing = [task_id for task_id in acknowledged if restarted.request("GET", f"/tasks/{task_id}")[0] != 200]
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged tasks are missing"
    restarted.close()


def test_sigterm_to_the_parent_drains_every_process_and_exits_0(two, database_env):
    pids = [child.pid for child in children(two)]
    assert two.stop() == 0
    assert not [pid for pid in pids if psutil.pid_exists(pid)]
    exported = cli(two.data_dir, "export", env=database_env).stdout.splitlines()
    offline = {(e["payload"]["desktopId"], e["payload"]["reason"]) for e in map(json.loads, exported)
               if e["type"] == "desktop.offline"}
    assert offline == {("local-1", "stopped"), ("local-2", "stopped")}  # each left as a single serve does


@pytest.mark.sqlite_file  # the worker is registered in the data dir's file, before the server starts
def test_a_process_that_cannot_start_makes_the_parent_give_up_with_a_sentence(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    settings = from_env(data_dir=str(data_dir))

    async def a_worker_named_local_2(log, models) -> None:  # so process 2's own desktop cannot register
        await Commands(log, models).desktop("local-2", Register(
            session_id="s", agents=["echo"], capacity=1, version="0", hostname="elsewhere",
        ), Meta(actor="test"))

    asyncio.run(_with_log(settings, a_worker_named_local_2))
    server = Server(data_dir, {"MC_PROCESSES": 2}).spawn()
    try:
        code = server.process.wait(120)
    finally:
        server.stop()
    output = server.own_output()
    assert code == 2, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("mission-control: process 2 of 2 exited with status 3, the 5th time in a row before it "
                           "was ready"), last
    assert "a worker's; a node's own desktop needs another name" in output
    assert output.count("Mission Control is listening") == 0


def test_one_process_serves_as_before(make_server):
    server = make_server()
    assert children(server) == []  # no supervisor: the process itself serves
    desktops = [d["id"] for d in server.client().get("/desktops").json()]
    assert desktops == ["local"]


def test_each_webhook_is_sent_by_one_process_only(tmp_path):
    """Receivers drop duplicates by X-MC-Delivery, but N processes must not make every delivery N."""
    from tests.test_webhooks import SETTINGS, Receiver, ReceiverHandler

    class Slow(ReceiverHandler):  # slower than another process's tail: each process would see the delivery due
        def do_POST(self) -> None:
            time.sleep(1)
            super().do_POST()

    receiver = Receiver()
    receiver.RequestHandlerClass = Slow
    threading.Thread(target=receiver.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    server = Server(tmp_path / "data", {**SETTINGS, "MC_PROCESSES": 2}).start()
    try:
        client = server.client()
        for n in range(2):  # the second's delivery comes after the first's in every process's fold
            task = client.post("/tasks", json={"type": "prompt", "content": "x",
                                               "webhookUrl": f"{receiver.url}/hook-{n}"}).json()
            assert client.post(f"/tasks/{task['id']}/cancel").status_code == 200
            wait_for(lambda: receiver.got(f"/hook-{n}"), what=f"delivery {n}")
        def attempted() -> list[dict]:  # recorded once the receiver has answered: it may lag its receipt
            return client.get("/events", params={"types": "webhook.attempted"}).json()["events"]

        wait_for(lambda: len(attempted()) >= 2, what="both attempts recorded")
        assert [len(receiver.got(f"/hook-{n}")) for n in range(2)] == [1, 1]
        assert len(attempted()) == 2, attempted()
    finally:
        server.stop()
        receiver.shutdown()
        receiver.server_close()


def test_a_busy_port_or_disagreeing_settings_fail_in_one_sentence_before_any_process_starts(two, database_env):
    same_port = cli(two.data_dir, "serve", "--processes", "2", "--port", str(two.port), env=database_env,
                    check=False)  # held by the first's processes, which SO_REUSEPORT alone would let it share
    assert same_port.returncode == 2
    assert same_port.stderr.strip() == f"mission-control: cannot listen on http://127.0.0.1:{two.port}/: " \
                                       "Address already in use"
    differing = cli(two.data_dir, "serve", "--processes", "2", "--port", str(free_port()),
                    env={**database_env, "MC_MAX_CONCURRENT": "3"}, check=False)
    assert differing.returncode == 2
    assert differing.stderr.strip().startswith("mission-control: max_concurrent (MC_MAX_CONCURRENT) is 3 on this "
                                               "node but 5 in the log")
    assert "listening" not in differing.stdout
    bad = cli(two.data_dir, "serve", "--processes", "0", env=database_env, check=False)
    assert bad.returncode != 0 and bad.stderr.strip() == (
        "mission-control: the setting processes (MC_PROCESSES) is invalid: 0 is not allowed, expected `int` >= 1.")
