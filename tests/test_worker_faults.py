"""A worker that dies, hangs past its lease, or loses its key: its runs end `lost`, the desktop goes
offline, and nothing it reports afterwards is recorded. Leases of 2 s; every wait is bounded."""

from __future__ import annotations

import signal

from tests.api_helpers import UNLIMITED, wait_for
from tests.server import cli
from tests.worker import (
    Worker, gone, last_run, output, shell_agent, start_task, wait_desktop, wait_file, wait_status,
)

LEASE = {"MC_LEASE_SECONDS": "2", **UNLIMITED}


def test_a_worker_killed_mid_run_loses_its_run_and_the_next_one_on_its_workdir_kills_what_it_left(
    make_server, tmp_path,
):
    server = make_server(**LEASE)
    client = server.client()
    agent = shell_agent(client, "sh")
    leader, child = tmp_path / "leader.pid", tmp_path / "child.pid"
    worker = Worker(server, "box", tmp_path / "box", agents="shell").start()
    task_id = start_task(client, agent, f"echo first; sleep 60 & echo $! > {child}; echo $$ > {leader}; wait",
                         desktop="box")
    pids = [int(wait_file(leader)), int(wait_file(child))]
    wait_for(lambda: output(client, task_id) == "first\n", what="the first line to be reported")

    worker.stop(signal.SIGKILL)

    failed = wait_status(client, task_id, "failed", "done")
    run = last_run(client, task_id)
    assert failed["status"] == "failed" and run["reason"] == "lost", run
    assert "box" in run["error"], run
    assert output(client, task_id) == "first\n"  # what it had reported stays
    wait_desktop(client, "box", "offline")
    assert not any(gone(pid) for pid in pids)  # a worker killed -9 cannot stop its runs: the next one does

    with Worker(server, "box", tmp_path / "box", agents="shell").start():
        wait_for(lambda: all(gone(pid) for pid in pids), what="the processes the killed worker left to be killed")


def test_a_worker_stopped_past_its_lease_records_nothing_more_stops_the_run_and_comes_back(make_server, tmp_path):
    server = make_server(**LEASE)
    client = server.client()
    agent = shell_agent(client, "sh")
    leader = tmp_path / "leader.pid"
    with Worker(server, "box", tmp_path / "box", agents="shell").start() as worker:
        task_id = start_task(client, agent, f"echo $$ > {leader}; i=0; while true; do i=$((i+1)); echo $i; "
                             "sleep 0.1; done", desktop="box")
        pid = int(wait_file(leader))
        wait_for(lambda: output(client, task_id), what="some output")

        worker.send(signal.SIGSTOP)
        try:
            wait_status(client, task_id, "failed")
            wait_desktop(client, "box", "offline")
        finally:
            worker.send(signal.SIGCONT)

        wait_for(lambda: gone(pid), what="the lost run's process to be stopped")
        wait_desktop(client, "box", "online")
        assert last_run(client, task_id)["reason"] == "lost"
        types = [e["type"] for e in client.get(f"/tasks/{task_id}/events").json()]
        assert "task.output" not in types[types.index("task.failed"):], types
        desktop_events = client.get("/events", params={"types": "desktop."}).json()["events"]
        assert [e["type"] for e in desktop_events][-2:] == ["desktop.offline", "desktop.online"]

        again = start_task(client, agent, "echo again", desktop="box")
        assert wait_status(client, again, "done", "failed")["result"] == "again\n"


def test_revoking_a_worker_key_loses_its_runs_and_the_worker_exits_2(make_server, tmp_path):
    server = make_server(**LEASE)
    client = server.client()
    agent = shell_agent(client, "sh")
    leader = tmp_path / "leader.pid"
    worker = Worker(server, "box", tmp_path / "box", agents="shell").start()
    try:
        task_id = start_task(client, agent, f"echo $$ > {leader}; sleep 60", desktop="box")
        pid = int(wait_file(leader))

        cli(server.data_dir, "token", "revoke", worker.key_id)  # another process than the server's

        wait_status(client, task_id, "failed")
        run = last_run(client, task_id)
        assert run["reason"] == "lost" and "revoked" in run["error"], run
        wait_desktop(client, "box", "offline")
        assert worker.exit_code() == 2
        assert "revoked" in worker.output().rpartition("mission-control: ")[2].lower()
        assert gone(pid)  # it stops its runs before it exits
    finally:
        worker.stop(signal.SIGKILL)
