"""SIGTERM drains a worker: it takes nothing new, finishes what it has, leaves and exits 0. A
second SIGTERM stops its runs, reported interrupted."""

from __future__ import annotations

import signal

from tests.api_helpers import UNLIMITED, refused, wait_for
from tests.worker import (
    Worker, gone, last_run, shell_agent, start_task, wait_desktop, wait_file, wait_status,
)


def test_sigterm_drains_the_worker_which_finishes_its_run_leaves_and_exits_0(make_server, tmp_path):
    server = make_server(**UNLIMITED)
    client = server.client()
    agent = shell_agent(client, "sh")
    gate, started = tmp_path / "gate", tmp_path / "started"
    worker = Worker(server, "box", tmp_path / "box", agents="shell", capacity=2).start()
    try:
        task_id = start_task(client, agent, f"echo $$ > {started}; while [ ! -e {gate} ]; do sleep 0.05; done; "
                             "echo finished", desktop="box")
        wait_file(started)

        worker.send(signal.SIGTERM)
        wait_desktop(client, "box", "draining")
        waiting = client.post("/tasks", json={"type": "command", "content": "echo late", "desktopId": "box"}).json()
        refused(client.post(f"/tasks/{waiting['id']}/run", json={"agentId": agent}), 503, "desktop_unavailable")
        assert worker.process.poll() is None  # it waits for its run

        gate.touch()
        done = wait_status(client, task_id, "done", "failed")
        assert done["status"] == "done" and done["result"] == "finished\n", done
        assert worker.exit_code() == 0
        wait_desktop(client, "box", "offline")
        assert client.get("/events", params={"types": "desktop.offline"}).json()["events"][-1]["payload"]["reason"] \
            == "left"
    finally:
        worker.stop(signal.SIGKILL)


def test_a_second_sigterm_stops_the_runs_reports_them_interrupted_and_exits_0(make_server, tmp_path):
    server = make_server(**UNLIMITED)
    client = server.client()
    agent = shell_agent(client, "sh")
    leader, child = tmp_path / "leader.pid", tmp_path / "child.pid"
    worker = Worker(server, "box", tmp_path / "box", agents="shell").start()
    try:
        task_id = start_task(client, agent, f"sleep 60 & echo $! > {child}; echo $$ > {leader}; wait", desktop="box")
        pids = [int(wait_file(leader)), int(wait_file(child))]

        worker.send(signal.SIGTERM)
        wait_desktop(client, "box", "draining")
        worker.send(signal.SIGTERM)

        wait_status(client, task_id, "failed", "done")
        run = last_run(client, task_id)
        assert run["reason"] == "interrupted" and "box" in run["error"] and "stopped" in run["error"], run
        assert worker.exit_code() == 0
        assert all(gone(pid) for pid in pids)  # its whole process group, before the worker exits
        wait_desktop(client, "box", "offline")
        wait_for(lambda: not list((tmp_path / "box" / "runs").glob("*.pids")), what="the run's records to go")
    finally:
        worker.stop(signal.SIGKILL)
