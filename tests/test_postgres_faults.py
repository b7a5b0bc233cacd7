"""Nodes on PostgreSQL through its faults (issue 15), with real processes: the server crashing and
restarting under load (on a cluster of the test's own, tests/pgcluster.py), a node's LISTEN
connection killed or gone silent, and a node killed -9 while it writes. Every answer is 2xx or a
503 with a sentence, the nodes recover by themselves, and nothing they acknowledged is lost."""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from pathlib import Path

import httpx
import msgspec
import psycopg
import pytest

from tests.api_helpers import wait_for
from tests.server import API, Server, cli
from tests.test_nodes import Nodes

REQUEST_SECONDS = 20
"""No request may take longer, whatever the database is doing."""


class Writers:
    """Clients creating tasks in a loop on some nodes, each in a thread, until `stop` or `limit`
    tasks each. Every answer is kept: (node index, status, task id or None, body); a request that
    got no answer in REQUEST_SECONDS is kept with status "timeout", one whose node vanished with
    "no answer"."""

    def __init__(self, nodes: list[Server], per_node: int = 2, limit: int = 2000):
        self.answers: list[tuple[int, int | str, str | None, str]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._write, args=(i, node, n, limit), daemon=True)
            for i, node in enumerate(nodes) for n in range(per_node)
        ]

    def start(self) -> Writers:
        for thread in self._threads:
            thread.start()
        return self

    def _write(self, index: int, node: Server, n: int, limit: int) -> None:
        headers = {"Authorization": f"Bearer {node.admin_token}"}
        with httpx.Client(base_url=node.base_url + API, headers=headers, timeout=REQUEST_SECONDS) as client:
            for i in range(limit):
                if self._stop.is_set():
                    return
                try:
                    r = client.post("/tasks", json={"type": "prompt", "content": f"node {index} writer {n} #{i}"})
                    answer = (index, r.status_code, r.json()["id"] if r.status_code == 201 else None, r.text)
                except httpx.TimeoutException:
                    answer = (index, "timeout", None, "")
                except httpx.TransportError:
                    answer = (index, "no answer", None, "")
                with self._lock:
                    self.answers.append(answer)
                if answer[1] != 201:
                    time.sleep(0.05)  # as a client told Retry-After would, only sooner

    def count(self, status: int | str, node: int | None = None, since: int = 0) -> int:
        with self._lock:
            return sum(1 for i, s, _, _ in self.answers[since:] if s == status and node in (None, i))

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(REQUEST_SECONDS + 5)
            assert not thread.is_alive(), "a writer is still waiting for an answer"

    def acknowledged(self) -> list[str]:
        return [task_id for _, status, task_id, _ in self.answers if status == 201]


def positions(url: str) -> list[int]:
    with psycopg.connect(url, connect_timeout=5) as conn:
        return [row[0] for row in conn.execute("SELECT position FROM events ORDER BY position")]


def assert_whole(url: str, node: Server, acknowledged: list[str], data_dir: Path) -> None:
    """Every acknowledged task is there, positions run 1..N without a gap, and the chain verifies."""
    client = node.client()
    missing = [task_id for task_id in acknowledged if client.get(f"/tasks/{task_id}").status_code != 200]
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged tasks are lost: {missing[:5]}"
    stored = positions(url)
    assert stored == list(range(1, len(stored) + 1)), "positions have a gap"
    verified = cli(data_dir, "verify", "--database", url)
    assert verified.stdout.startswith(f"ok: {len(stored)} events"), verified.stdout + verified.stderr


def test_nodes_answer_503_while_postgresql_restarts_under_load_and_lose_nothing(private_postgres, tmp_path):
    url = private_postgres.create_database("mc")
    nodes = Nodes(tmp_path, url)
    try:
        serving = [nodes.start(0), nodes.start(1)]
        writers = Writers(serving).start()
        try:
            wait_for(lambda: writers.count(201, 0) >= 20 and writers.count(201, 1) >= 20, 30, "writes before the crash")
            private_postgres.stop("immediate")  # a crash: no checkpoint, recovery from the WAL
            down = len(writers.answers)
            for n in range(2):
                wait_for(lambda: writers.count(503, n, since=down) >= 20, 30, f"node {n} to answer 503")
                ready = serving[n].http().get("/readyz")
                assert ready.status_code == 503, ready.text
                assert not ready.json()["ready"] and "database cannot be reached" in ready.json()["detail"]
            private_postgres.start()
            back = len(writers.answers)
            for n in range(2):  # the same processes, never restarted
                wait_for(lambda: writers.count(201, n, since=back) >= 20, 60, f"node {n} to write again")
        finally:
            writers.stop()

        statuses = {status for _, status, _, _ in writers.answers}
        assert statuses <= {201, 503}, [a for a in writers.answers if a[1] not in (201, 503)][:3]
        for _, status, _, body in writers.answers:
            if status == 503:
                refusal = msgspec.json.decode(body)
                assert refusal["code"] == "storage_unavailable" and refusal["detail"].endswith("."), body
        for node in serving:
            assert node.http().get("/readyz").status_code == 200
            assert "Traceback" not in node.output()
            assert node.output().count("lost the database") == 1, node.output()[-3000:]
        assert_whole(url, serving[1], writers.acknowledged(), nodes.data_dir(1))
    finally:
        for node in nodes.started:
            node.stop()


def listener_pids(url: str, node: Server) -> list[int]:
    with psycopg.connect(url, connect_timeout=5) as conn:
        return [row[0] for row in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
            (f"mission-control-listen {node.process.pid}",),
        )]


class Watching:
    """An SSE client of `node`'s activity stream, its `data:` lines in a queue."""

    def __init__(self, node: Server):
        self.lines: queue.Queue[str] = queue.Queue()
        after = node.client().get("/events").json()["head"]
        self._client = node.client(timeout=httpx.Timeout(10, read=None))
        self._stream = self._client.stream("GET", "/activity/stream", params={"after": after})
        self._response = self._stream.__enter__()
        assert self._response.status_code == 200
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for line in self._response.iter_lines():
                if line.startswith("data:"):
                    self.lines.put(line)
        except (httpx.HTTPError, httpx.StreamError):
            pass  # closed at the end of the test

    def wait_for_task(self, task_id: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                if task_id in self.lines.get(timeout=left):
                    return
            except queue.Empty:
                break
        raise AssertionError(f"task {task_id} did not reach the stream in {timeout}s")

    def close(self) -> None:
        self._stream.__exit__(None, None, None)
        self._client.close()


def _terminated(url: str, pid: int) -> None:
    with psycopg.connect(url, connect_timeout=5) as conn:
        assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]


def _silenced(url: str, pid: int) -> None:
    """The backend stopped, its connection left open: a server that went silent, not one that left."""
    os.kill(pid, signal.SIGSTOP)


@pytest.mark.parametrize("fault", [_terminated, _silenced], ids=["terminated", "silenced"])
def test_a_node_whose_listener_dies_notices_reconnects_and_catches_up(fault, private_postgres, tmp_path):
    # The cluster is the test's own: a stopped backend must not stall the shared one's notifications.
    url = private_postgres.create_database("mc")
    nodes = Nodes(tmp_path, url)
    watching = None
    try:
        watched, writing = nodes.start(0), nodes.start(1)
        (old,) = wait_for(lambda: listener_pids(url, watched), 10, "the node's listener")
        watching = Watching(watched)
        fault(url, old)
        try:
            (new,) = wait_for(lambda: [p for p in listener_pids(url, watched) if p != old], 30, "a new listener")
        finally:
            if fault is _silenced:  # it goes once it reads that the node closed its end
                os.kill(old, signal.SIGCONT)
        task = writing.client().post("/tasks", json={"type": "prompt", "content": "after the listener died"})
        assert task.status_code == 201, task.text
        watching.wait_for_task(task.json()["id"], 20)
        wait_for(lambda: listener_pids(url, watched) == [new], 10, "the old listener to be gone")
        assert watched.output().count("lost the database") == 1, watched.output()[-3000:]
    finally:
        if watching is not None:
            watching.close()
        for node in nodes.started:
            node.stop()


def test_a_node_killed_under_write_load_loses_nothing_it_acknowledged_and_the_other_serves_on(
    postgres_database, tmp_path
):
    nodes = Nodes(tmp_path, postgres_database)
    try:
        killed, surviving = nodes.start(0), nodes.start(1)
        writers = Writers([killed, surviving]).start()
        try:
            wait_for(lambda: writers.count(201, 0) >= 30 and writers.count(201, 1) >= 30, 30, "writes on both nodes")
            killed.kill()
            after = len(writers.answers)
            wait_for(lambda: writers.count(201, 1, since=after) >= 30, 30, "the other node to write on")
        finally:
            writers.stop()
        assert {s for i, s, _, _ in writers.answers if i == 1} == {201}  # the other node never noticed
        assert {s for i, s, _, _ in writers.answers if i == 0} <= {201, "no answer"}
        reads = surviving.client().get("/tasks", params={"limit": 10})
        assert reads.status_code == 200 and reads.json()
        assert_whole(postgres_database, surviving, writers.acknowledged(), nodes.data_dir(1))
    finally:
        for node in nodes.started:
            node.stop()
