"""`mission-control serve` on PostgreSQL (issue 15): a real server process on a database of its own.
The log's and read models' contracts run on PostgreSQL in tests/test_log_contract.py and
tests/test_readmodels_contract.py."""

from __future__ import annotations

from tests.server import cli
from tests.test_api_tasks import create, get, run, wait_status


def test_serve_on_postgresql_keeps_tasks_across_a_restart_and_verifies(postgres_database, make_server, tmp_path):
    # postgres_database first: its database is dropped after the server has stopped
    server = make_server(MC_DATABASE_URL=postgres_database)
    assert f"with its log in {postgres_database}, its data in" in server.output()
    c = server.client()
    task = create(c, title="on postgres")
    run(c, task["id"])
    done = wait_status(c, task["id"], "done")  # the node's own echo agent ran it
    assert (tmp_path / "data-0" / "mission-control.db").exists() is False  # nothing went to SQLite

    server.restart()
    c = server.client()
    assert get(c, task["id"]) == done
    assert [t["id"] for t in c.get("/tasks").json()] == [task["id"]]
    verified = cli(server.data_dir, "verify", env={"MC_DATABASE_URL": postgres_database})
    assert verified.stdout.startswith("ok: ")
