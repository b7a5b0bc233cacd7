"""A worker keeps its run through a server's crash: it resends what was not acknowledged, and the
output arrives whole, in order, each chunk once."""

from __future__ import annotations

from tests.api_helpers import UNLIMITED, wait_for
from tests.worker import Worker, output, shell_agent, start_task, wait_status


def test_a_run_on_a_worker_survives_the_server_killed_and_restarted_on_its_data_dir(make_server, tmp_path):
    server = make_server(**UNLIMITED)
    client = server.client()
    agent = shell_agent(client, "sh")
    with Worker(server, "box", tmp_path / "box", agents="shell").start() as worker:
        pid = worker.pid
        task_id = start_task(client, agent, "for i in $(seq 1 200); do echo $i; sleep 0.02; done", desktop="box")
        wait_for(lambda: len(output(client, task_id).splitlines()) >= 20, what="20 lines to be reported")

        server.kill()  # SIGKILL: whatever was in flight is lost on the way
        server.start()
        client = server.client()

        done = wait_status(client, task_id, "done", "failed", timeout=60)
        assert done["status"] == "done", done
        assert output(client, task_id) == "".join(f"{i}\n" for i in range(1, 201))
        events = client.get(f"/tasks/{task_id}/events", params={"limit": 5000}).json()
        seqs = [e["payload"]["seq"] for e in events if e["type"] == "task.output"]
        assert seqs == list(range(1, len(seqs) + 1)), seqs
        assert worker.process.poll() is None and worker.pid == pid  # the same worker throughout
