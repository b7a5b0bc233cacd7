"""GET /activity/stream as its consumers use it: read with an independent SSE client (httpx-sse)
or raw sockets against a real `mission-control serve`, and checked against the log (GET /events).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import httpx
import psutil
import pytest
from httpx_sse import connect_sse

from service.http.auth import default_project_id
from tests.api_helpers import device, refused, wait_for
from tests.server import API, Server, cli, free_port

STREAM = "/activity/stream"
FAST = {  # heartbeats every half second; no rate limit in the way of many connections
    "MC_HEARTBEAT_SECONDS": "0.5",
    "MC_RATE_LIMIT_PER_SECOND": "1000000",
    "MC_RATE_LIMIT_BURST": "1000000",
    "MC_DURABLE": "false",
}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("stream") / "data", FAST).start()
    yield s
    s.stop()


# --- helpers ----------------------------------------------------------------------------------


class Reader(threading.Thread):
    """One stream read with httpx-sse on a thread until `until(events)` is true.

    `events` are (id, parsed data) of the messages that carry data; the `retry:` hint that
    opens the stream has none and is kept in `hello` (a heartbeat later has none either)."""

    def __init__(self, server: Server, until: Callable[[list], bool], *, token: str | None = None,
                 params: dict | None = None, headers: dict | None = None):
        super().__init__(daemon=True)
        self.server, self.until, self.params = server, until, params or {}
        token = server.admin_token if token is None else token
        self.headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
        self.events: list[tuple[int, dict]] = []
        self.hello = None
        self.connected = threading.Event()
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.server.base_url + API, timeout=10) as client:
                with connect_sse(client, "GET", STREAM, params=self.params, headers=self.headers) as source:
                    assert source.response.status_code == 200, source.response.read()
                    for sse in source.iter_sse():
                        if not sse.data:  # the opening hint; after it, heartbeats (httpx-sse gives them the last id)
                            if self.hello is None:
                                self.hello = sse
                            self.connected.set()
                            continue
                        assert sse.event == "message"  # no `event:` field
                        self.events.append((int(sse.id), json.loads(sse.data)))
                        if self.until(self.events):
                            return
        except BaseException as exc:  # reported by result()
            self.error = exc
        finally:
            self.connected.set()

    def result(self, timeout: float = 30) -> list[tuple[int, dict]]:
        self.join(timeout)
        assert not self.is_alive(), f"the stream did not deliver what was expected in {timeout}s: {self.events[-3:]}"
        if self.error is not None:
            raise self.error
        return self.events


def reached(position: int) -> Callable[[list], bool]:
    return lambda events: events[-1][0] >= position


def the_log(client: httpx.Client, **params) -> list[dict]:
    """Every event, as GET /events serves it."""
    events, after = [], 0
    while True:
        page = client.get("/events", params={"after": after, "limit": 5000, **params}).json()
        events += page["events"]
        if page["next"] >= page["head"] or not page["events"]:
            return events
        after = page["next"]


def head(client: httpx.Client) -> int:
    return client.get("/events", params={"limit": 1}).json()["head"]


def new_task(client: httpx.Client, title: str = "t") -> str:
    response = client.post("/tasks", json={"type": "command", "content": "echo hi", "title": title})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def touch(client: httpx.Client, task_id: str, title: str) -> int:
    """A task.updated event on the task; returns the task's version."""
    response = client.patch(f"/tasks/{task_id}", json={"title": title})
    assert response.status_code == 200, response.text
    return response.json()["version"]


def metric(server: Server, name: str) -> float:
    text = httpx.get(server.base_url + "/metrics", headers={"Authorization": f"Bearer {server.admin_token}"}).text
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


# --- exactness ----------------------------------------------------------------------------------


def test_resume_by_last_event_id_mid_burst_delivers_exactly_the_log(srv):
    client = srv.client()
    new_task(client)
    appended = threading.Event()

    def burst() -> None:
        with httpx.Client(base_url=srv.base_url + API, headers=client.headers, timeout=30) as own:
            for n in range(300):
                new_task(own, f"burst {n}")
        appended.set()

    start = head(client)
    first = Reader(srv, lambda events: len(events) >= start + 40)  # from the beginning: history, then live
    appender = threading.Thread(target=burst, daemon=True)
    appender.start()
    seen = first.result()
    assert not appended.is_set(), "the burst ended before the first connection did: nothing to prove"
    second = Reader(srv, reached(start + 300), headers={"Last-Event-ID": str(seen[-1][0])})
    appender.join(60)
    union = seen + second.result()
    log = the_log(client)
    assert [position for position, _ in union] == list(range(1, len(log) + 1))
    assert [event for _, event in union] == log  # the recorded events, exactly as GET /events serves them
    assert first.hello.retry == 2000


def test_after_resumes_and_last_event_id_wins_over_it(srv):
    client = srv.client()
    new_task(client)
    end = head(client)
    events = Reader(srv, reached(end), params={"after": end - 2}).result()
    assert [p for p, _ in events] == [end - 1, end]
    events = Reader(srv, reached(end), params={"after": 0}, headers={"Last-Event-ID": str(end - 1)}).result()
    assert [p for p, _ in events] == [end]


def test_history_then_live_without_a_gap_at_the_seam(srv):
    client = srv.client()
    start = head(client)
    reader = Reader(srv, reached(start + 20), params={"after": start - 5})
    reader.connected.wait(10)
    for n in range(20):
        new_task(client, f"live {n}")
    assert [p for p, _ in reader.result()] == list(range(start - 4, start + 21))


# --- the wire format and heartbeats -----------------------------------------------------------


def test_frames_carry_id_and_data_only_and_heartbeats_arrive(srv):
    client = srv.client()
    new_task(client)
    end = head(client)
    blocks: list[list[str]] = []
    lines: list[str] = []
    heartbeats = 0
    with httpx.Client(timeout=10) as raw:
        with raw.stream("GET", srv.base_url + API + STREAM, params={"after": end - 3},
                        headers={"Authorization": f"Bearer {srv.admin_token}"}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-store"
            deadline = time.monotonic() + 20
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                    continue
                blocks.append(lines)
                lines = []
                if len(blocks) > 4 and all(line.startswith(":") for line in blocks[-1]):
                    heartbeats += 1
                if heartbeats >= 2 or time.monotonic() > deadline:
                    break
    assert heartbeats >= 2, f"no heartbeat comments in {blocks}"
    hello, *messages = blocks
    assert "retry: 2000" in hello and all(line.startswith((":", "retry:")) for line in hello)
    events = [b for b in messages if not b[0].startswith(":")]
    assert [b[0] for b in events] == [f"id: {p}" for p in range(end - 2, end + 1)]
    for block in events:
        assert len(block) == 2 and block[1].startswith("data: {"), block  # no `event:` field
        assert json.loads(block[1][len("data: "):])["position"] == int(block[0][len("id: "):])


# --- filters -------------------------------------------------------------------------------


def test_filters(srv):
    client = srv.client()
    a, b = new_task(client, "a"), new_task(client, "b")
    device(client, "d1")
    for task_id in (a, b):
        touch(client, task_id, "renamed")
        assert client.post(f"/tasks/{task_id}/presence", json={"deviceId": "d1"}).status_code == 204
    assert client.post(f"/tasks/{b}/cancel", json={}).status_code == 200

    def presence(task_id: str, marker: str) -> None:
        device(client, marker)
        assert client.post(f"/tasks/{task_id}/presence", json={"deviceId": marker}).status_code == 204

    cases = [  # the query, what it must match, an append that matches it and carries a marker
        ({"types": "task.created"}, lambda e: e["type"] == "task.created", lambda m: new_task(client, m)),
        ({"types": "task.updated,presence.marked"}, lambda e: e["type"] in ("task.updated", "presence.marked"),
         lambda m: touch(client, a, m)),
        ({"types": "task."}, lambda e: e["type"].startswith("task."), lambda m: touch(client, b, m)),
        ({"types": "presence.*"}, lambda e: e["type"].startswith("presence."), lambda m: presence(a, m)),
        ({"taskId": a}, lambda e: e["stream"] in (f"task-{a}", f"presence-{a}"), lambda m: touch(client, a, m)),
        ({"stream": f"task-{b}"}, lambda e: e["stream"] == f"task-{b}", lambda m: touch(client, b, m)),
        ({"taskId": a, "types": "presence.marked"}, lambda e: e["stream"] == f"presence-{a}",
         lambda m: presence(a, m)),
    ]
    for n, (params, matches, sentinel) in enumerate(cases):
        marker = f"sentinel {n}"
        def until(events, marker=marker) -> bool:
            return marker in json.dumps(events[-1][1]["payload"])

        live = Reader(srv, until, params={**params, "after": head(client)})
        live.connected.wait(10)
        new_task(client, "noise")  # events around the sentinel that some filters must drop
        touch(client, b if params.get("taskId") == a else a, "noise")
        sentinel(marker)
        history = Reader(srv, until, params=params)
        log = the_log(client)
        for reader in (live, history):
            got = [event for _, event in reader.result()]
            after = reader.params.get("after", 0)
            assert got == [e for e in log if matches(e) and e["position"] > after], params


def test_filters_that_exclude_each_other_stream_nothing_but_heartbeats(srv):
    client = srv.client()
    task_id = new_task(client)
    with httpx.Client(timeout=10) as raw:
        with raw.stream("GET", srv.base_url + API + STREAM, params={"taskId": task_id, "stream": "agent-x"},
                        headers={"Authorization": f"Bearer {srv.admin_token}"}) as response:
            assert response.status_code == 200
            touch(client, task_id, "not for this stream")
            lines = []
            for line in response.iter_lines():
                lines.append(line)
                if sum(line.startswith(": ping") for line in lines) == 2:
                    break
    assert not any(line.startswith(("id:", "data:")) for line in lines), lines


def test_a_filtered_stream_resumes_exactly(srv):
    client = srv.client()
    task_id = new_task(client)
    for n in range(5):
        touch(client, task_id, f"before {n}")
    first = Reader(srv, lambda events: len(events) >= 3, params={"types": "task.updated"}).result()
    for n in range(5):  # while disconnected: matching and other events
        touch(client, task_id, f"between {n}")
        new_task(client)
    touch(client, task_id, "last")
    end = head(client)
    second = Reader(srv, reached(end), params={"types": "task.updated"},
                    headers={"Last-Event-ID": str(first[-1][0])}).result()
    union = [event for _, event in first + second]
    assert union == the_log(client, types="task.updated")


# --- who sees what -----------------------------------------------------------------------------


def test_auth_and_the_query_string_token_is_never_logged(srv):
    anonymous = srv.client(token="")
    refused(anonymous.get(STREAM), 401)
    assert anonymous.get(STREAM).headers["www-authenticate"].startswith("Bearer")
    refused(anonymous.get(STREAM, params={"access_token": "mc_not-a-key"}), 401)
    refused(srv.client(token=srv.token("carol", "task:write")).get(STREAM), 403)

    token = srv.token("dave", "task:read")
    refused(anonymous.get("/tasks", params={"access_token": token}), 401)  # the stream path only
    refused(anonymous.get(STREAM, params={"access_token": token, "after": "x"}), 400)
    refused(anonymous.get(STREAM, params={"access_token": token, "taskId": "nope"}), 400)
    logged = srv.output().count("activity_stream")
    reader = Reader(srv, lambda events: True, token="", params={"access_token": token})
    assert reader.result() and reader.hello.retry == 2000
    # A stream's access-log line is written when it ends: wait for it before reading the logs.
    wait_for(lambda: srv.output().count("activity_stream") > logged, 5, "the stream's access-log line")
    assert token not in srv.output()
    assert token[3:20] not in srv.output()


def test_tenancy_a_member_sees_only_their_projects(srv):
    admin = srv.client()
    bob_token = srv.token("bob", "task:read,task:write")
    bob = srv.client(token=bob_token)
    others = new_task(admin, "the admin's")
    mine = new_task(bob, "bob's")
    touch(admin, others, "secret")
    touch(bob, mine, "mine")
    end = head(admin)
    events = [e for _, e in Reader(srv, reached(end), token="", params={"access_token": bob_token}).result()]
    streams = {e["stream"] for e in events}
    assert f"task-{mine}" in streams
    assert f"task-{others}" not in streams
    assert not any(e["type"].startswith("apikey.") for e in events)
    assert all(e["stream"].split("-")[0] in ("task", "presence", "project", "agent") for e in events)
    assert {e["stream"] for e in events if e["stream"].startswith("project-")} == {
        f"project-{default_project_id('bob')}"}


def test_the_stream_of_a_revoked_key_ends_within_a_second(srv):
    token = srv.token("erin", "task:read")
    (key_id,) = [line.split()[0] for line in cli(srv.data_dir, "token", "list").stdout.splitlines() if " erin " in line]
    admin = srv.client()
    stop = threading.Event()

    def keep_appending():  # events erin may see keep flowing: only the key's revocation ends her stream
        while not stop.wait(0.1):
            admin.post("/tasks", json={"type": "prompt", "content": "x", "projectId": default_project_id("erin")})

    reader = Reader(srv, lambda events: False, token="", params={"access_token": token, "after": str(head(admin))})
    writer = threading.Thread(target=keep_appending)
    writer.start()
    try:
        wait_for(lambda: len(reader.events) >= 5, 10, "erin's stream to deliver")  # so the revocation lands mid-stream
        cli(srv.data_dir, "token", "revoke", key_id)
        revoked = time.time()  # the revocation is in the log by now
        delivered = [event for _, event in reader.result(timeout=15)]  # returns once the server ends the stream
    finally:
        stop.set()
        writer.join()
    late = [event for event in delivered if recorded_at(event) >= revoked + 1]
    assert not late, f"{len(late)} events recorded over a second after the revocation reached the revoked key"
    refused(srv.client(token="").get(STREAM, params={"access_token": token}), 401)


def recorded_at(event: dict) -> float:
    """The event's recordedAt, in seconds since the epoch like time.time()."""
    return datetime.fromisoformat(event["recordedAt"].replace("Z", "+00:00")).timestamp()


# --- other processes, vanishing and stalled clients, shutdown -------------------------------------


def test_an_append_by_another_process_reaches_the_stream(srv):
    reader = Reader(srv, lambda events: events[-1][1]["payload"].get("user") == "erin",
                    params={"types": "apikey.", "after": head(srv.client())})
    reader.connected.wait(10)
    created = cli(srv.data_dir, "token", "create", "--user", "erin", "--scopes", "task:read")
    key_id = created.stdout.split()[1]
    # Nothing the server appends wakes the stream: it must find the other process's append itself.
    events = reader.result(5)
    assert events[-1][1]["type"] == "apikey.issued" and events[-1][1]["payload"]["keyId"] == key_id


class InProcess:
    """The app under uvicorn on a thread of this process, so that the test can see the asyncio
    tasks its event loop runs: what a vanished client must not leave behind."""

    def __init__(self, data_dir: Path):
        import uvicorn

        from service.app import create_app
        from service.cli import first_admin_key
        from service.settings import Settings

        settings = Settings(data_dir=str(data_dir), heartbeat_seconds=0.5, durable=False,
                            rate_limit_per_second=1e6, rate_limit_burst=1_000_000)
        data_dir.mkdir(parents=True)
        self.token = asyncio.run(first_admin_key(settings))
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
        ))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.server.serve(),), daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 30, "the in-process server to start")

    def tasks(self) -> tuple[int, int]:
        """(all tasks, tasks serving a request: uvicorn's per-request task and the response's own)."""

        async def count() -> tuple[int, int]:
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            names = [task.get_coro().__qualname__ for task in tasks]
            return len(tasks), sum("run_asgi" in name or "cancel_on_finish" in name for name in names)

        return asyncio.run_coroutine_threadsafe(count(), self.loop).result(10)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        # sse-starlette's shutdown watcher outlives the server: it watches this process's signals.
        leftover = asyncio.all_tasks(self.loop)
        for task in leftover:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
        self.loop.close()


def request_stream(sock: socket.socket, token: str) -> None:
    sock.sendall(f"GET {API}{STREAM} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())


def open_and_drop(port: int, token: str) -> None:
    """Connect, read up to the `connected` comment, and vanish without a word."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        request_stream(sock, token)
        got = b""
        while b": connected" not in got:
            chunk = sock.recv(65536)
            assert chunk, got
            got += chunk


def test_a_vanished_client_leaves_no_task_behind(tmp_path):
    server = InProcess(tmp_path / "data")
    try:
        open_and_drop(server.port, server.token)  # the first stream also starts sse-starlette's shutdown watcher
        wait_for(lambda: server.tasks()[1] == 0, 5, "the first stream's tasks to end")
        idle, _ = server.tasks()

        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            request_stream(sock, server.token)
            wait_for(lambda: server.tasks()[1] > 0, 5, "the stream's tasks to start")
        wait_for(lambda: server.tasks()[1] == 0, 5, "the closed stream's tasks to end")

        for _ in range(1000):
            open_and_drop(server.port, server.token)
        wait_for(lambda: server.tasks() == (idle, 0), 5, "every stream's tasks to end")
    finally:
        server.stop()


def test_a_thousand_streams_opened_and_dropped_leave_memory_flat(make_server):
    server = make_server(**FAST)
    process = psutil.Process(server.process.pid)
    others = metric(server, "mc_stream_subscribers")  # streams open before this test's
    for _ in range(200):  # warm up: allocator pools, caches, first-use imports
        open_and_drop(server.port, server.admin_token)
    wait_for(lambda: metric(server, "mc_stream_subscribers") == others, 5, "no subscriber left")
    before = process.memory_info().rss
    for _ in range(1000):
        open_and_drop(server.port, server.admin_token)
    wait_for(lambda: metric(server, "mc_stream_subscribers") == others, 5, "no subscriber left")
    growth = process.memory_info().rss - before
    assert growth < 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 1,000 connections"


def test_clients_that_stop_reading_hold_no_backlog_and_are_dropped_after_the_send_timeout(make_server):
    server = make_server(**FAST, MC_SEND_TIMEOUT_SECONDS="1")
    client = server.client()
    process = psutil.Process(server.process.pid)
    others = metric(server, "mc_stream_subscribers")  # streams open before this test's
    stalled = []
    for _ in range(20):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: buffers fill fast
        sock.connect(("127.0.0.1", server.port))
        request_stream(sock, server.admin_token)
        stalled.append(sock)  # and never read again
    try:
        wait_for(lambda: metric(server, "mc_stream_subscribers") == others + 20, 10, "the streams to start")
        before = process.memory_info().rss
        big = "x" * 200_000
        for _ in range(40):  # 8 MB of events that 20 clients cannot take: 160 MB if they were queued
            assert client.post("/tasks", json={"type": "prompt", "content": big}).status_code == 201
        wait_for(lambda: server.output().count("stream client dropped") == 20, 20, "the stalled clients to be dropped")
        wait_for(lambda: metric(server, "mc_stream_subscribers") == others, 5, "their responses to end")
        growth = process.memory_info().rss - before
        assert growth < 60 * 2**20, f"RSS grew by {growth / 2**20:.0f} MiB"
    finally:
        for sock in stalled:
            sock.close()
    output = server.output()
    assert "Traceback" not in output
    # a client that stops reading is a warning, not a server error
    assert "ASGI callable returned without completing response" not in output
    dropped = [json.loads(line) for line in output.splitlines() if "stream client dropped" in line]
    assert len(dropped) == 20 and {line["level"] for line in dropped} == {"warning"}


def test_sigterm_with_hundreds_of_open_streams_exits_cleanly_within_5_seconds(make_server):
    server = make_server(**FAST)
    new_task(server.client())
    others = metric(server, "mc_stream_subscribers")  # streams open before this test's

    async def scenario() -> list[bytes]:
        async def open_stream():
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(f"GET {API}{STREAM} HTTP/1.1\r\nHost: x\r\n"
                         f"Authorization: Bearer {server.admin_token}\r\n\r\n".encode())
            got = b""
            while b"task.created" not in got:
                got += await reader.read(65536)
            return reader, writer

        streams = await asyncio.gather(*(open_stream() for _ in range(300)))
        assert metric(server, "mc_stream_subscribers") == others + 300
        server.process.send_signal(signal.SIGTERM)
        # uvicorn's graceful shutdown (timeout_graceful_shutdown, 3 s) bounds it: 2 s to spare.
        deadline = time.monotonic() + 5
        while server.process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert server.process.poll() is not None, "still running 5 s after SIGTERM"
        endings = await asyncio.gather(*(reader.read() for reader, _ in streams))
        for _, writer in streams:
            writer.close()
        return endings

    endings = asyncio.run(scenario())
    assert server.process.returncode == 0
    assert all(ending.endswith(b"0\r\n\r\n") for ending in endings), "a stream was cut, not ended"
    assert "Traceback" not in server.output() and "ERROR" not in server.output()
