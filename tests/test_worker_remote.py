"""A run placed on a remote desktop runs in its worker's process, with its worker's environment."""

from __future__ import annotations

import sys

from tests.api_helpers import UNLIMITED, wait_for
from tests.worker import Worker, output, shell_agent, start_task, task, wait_status, worker_key


def test_a_run_on_a_remote_desktop_runs_under_its_worker_with_its_environment(make_server, tmp_path):
    server = make_server(**UNLIMITED)
    client = server.client()
    with Worker(server, "box", tmp_path / "box", agents="shell", env={"WORKER_ONLY": "yes"}).start() as worker:
        agent = shell_agent(client, "remote-shell", env=["WORKER_ONLY"])
        task_id = start_task(client, agent, "echo $WORKER_ONLY; echo parent=$PPID >&2", desktop="box")

        done = wait_status(client, task_id, "done", "failed")
        assert done["status"] == "done", done
        assert done["result"] == "yes\n"  # the variable is in the worker's environment only
        # The shell's parent is the worker: the server's process tree never held the run.
        assert f"parent={worker.pid}\n" in output(client, task_id)
        assert (tmp_path / "box" / "runs" / done["runId"]).is_dir()  # a working directory per run


def test_a_worker_refused_by_the_server_exits_2_with_its_sentence(make_server, tmp_path):
    server = make_server(**UNLIMITED)
    _, token = worker_key(server, "box")
    named_another = Worker(server, "other", tmp_path / "other", token=token)
    for worker, says in ((named_another, "box"), (Worker(server, "box", tmp_path / "bad", token="mc_nonsense"), "")):
        try:
            worker.start(timeout=20)
        except RuntimeError as exc:  # it exits before it is ready
            assert "exited with 2" in str(exc), exc
            assert "mission-control: " in worker.output()
            assert says in worker.output().rpartition("mission-control: ")[2]
        else:
            worker.stop()
            raise AssertionError(f"the worker on {worker.desktop} ran: {worker.output()[-2000:]}")


ASKS = """
import sys
sys.stdin.readline()  # the prompt
print("@@mc:input who?", flush=True)
print("hello", sys.stdin.readline().strip(), flush=True)
print("@@mc:input and?", flush=True)
print("then", sys.stdin.readline().strip(), flush=True)
"""


def test_an_agent_on_a_worker_asks_and_is_answered_in_order(make_server, tmp_path):
    server = make_server(**UNLIMITED)
    client = server.client()
    with Worker(server, "box", tmp_path / "box", agents="exec").start():
        created = client.post("/agents", json={"name": "asker", "kind": "exec",
                                               "config": {"argv": [sys.executable, "-c", ASKS]}})
        assert created.status_code == 201, created.text
        task_id = start_task(client, created.json()["id"], "go", desktop="box", kind="prompt")
        for question, answer in (("who?", "world"), ("and?", "more")):
            wait_for(lambda: (found := task(client, task_id))["status"] == "awaiting_input"
                     and found["inputPrompt"] == question, what=f"the question {question!r}")
            sent = client.post(f"/tasks/{task_id}/messages", json={"message": answer})
            assert sent.status_code in (200, 201, 202), sent.text
        done = wait_status(client, task_id, "done", "failed")
        assert done["status"] == "done", done
        assert output(client, task_id) == "hello world\nthen more\n"


def test_one_worker_a_workdir_and_its_key_never_in_its_log(make_server, tmp_path):
    server = make_server(**UNLIMITED)
    with Worker(server, "box", tmp_path / "shared").start() as first:
        second = Worker(server, "other", tmp_path / "shared")
        try:
            second.start(timeout=20)
        except RuntimeError as exc:
            assert "exited with 2" in str(exc), exc
        else:
            second.stop()
            raise AssertionError("a second worker ran on the same workdir")
        assert "another worker is running on" in second.output()
        assert first.process.poll() is None
    for worker in (first, second):
        assert worker.env["MC_TOKEN"] not in worker.output()
