"""The queue (issue 19): `POST /tasks/{id}/run` with `"queue": true` answers 202 `queued` with a
`queuePosition` when the run cannot start now, and the dispatcher starts queued runs as slots free,
higher priority first, first queued first within a priority. Through the app in this process (the
echo agent on its own desktop), its log read back as a client reads it."""

from __future__ import annotations

import httpx
import pytest

from events import decode
from tests.api_helpers import UNLIMITED, read_log, refused, wait_for

LONG = {"echo": {"delayMs": 600_000, "chunks": 1}}
"""An echo run that lasts until it is cancelled."""


def task(client: httpx.Client, content: str = "hello", **fields) -> dict:
    created = client.post("/tasks", json={"type": "prompt", "content": content, **fields})
    assert created.status_code == 201, created.text
    return created.json()


def run(client: httpx.Client, task_id: str, **body) -> httpx.Response:
    return client.post(f"/tasks/{task_id}/run", json=body)


def queued(client: httpx.Client, task_id: str, **body) -> dict:
    answer = run(client, task_id, queue=True, **body)
    assert answer.status_code == 202, answer.text
    assert answer.json()["status"] == "queued"
    return answer.json()


def status(client: httpx.Client, task_id: str) -> str:
    return client.get(f"/tasks/{task_id}").json()["status"]


def wait_status(client: httpx.Client, task_id: str, wanted: str) -> dict:
    return wait_for(lambda: (t := client.get(f"/tasks/{task_id}").json())["status"] == wanted and t,
                    what=f"task {task_id} {wanted}")


def queue_order(client: httpx.Client) -> list[tuple[str, int]]:
    """(id, queuePosition) of every queued task, as `GET /tasks?status=queued&sort=queue` lists them."""
    listed = client.get("/tasks", params={"status": "queued", "sort": "queue"})
    assert listed.status_code == 200, listed.text
    return [(t["id"], t["queuePosition"]) for t in listed.json()]


def started_order(client: httpx.Client, ids: list[str]) -> list[str]:
    """Which of `ids` started, in the order the log recorded their starts."""
    events, _ = read_log(client)
    started = [decode(e).task_id for e in events if e.type == "task.started"]
    return [task_id for task_id in started if task_id in ids]


@pytest.fixture
def limited(make_app_server):
    """An app with two run slots."""
    return make_app_server(MC_MAX_CONCURRENT="2", **UNLIMITED)


def test_at_the_limit_runs_start_by_priority_and_queue_positions_follow(limited):
    client = limited.client()
    long = [task(client, f"long {n}", metadata=LONG)["id"] for n in range(2)]
    for task_id in long:
        assert run(client, task_id, queue=True).status_code == 200  # a slot free: started at once
    low, high, mid = (task(client, f"priority {p}", priority=p, metadata=LONG)["id"] for p in (1, 9, 5))

    assert queued(client, low)["queuePosition"] == 1
    assert queued(client, high)["queuePosition"] == 1  # ahead of the lower priority queued before it
    assert queued(client, mid)["queuePosition"] == 2
    assert queue_order(client) == [(high, 1), (mid, 2), (low, 3)]
    assert client.get(f"/tasks/{low}").json()["queuePosition"] == 3
    assert client.get("/overview").json()["tasks"]["queued"] == 3
    refused(run(client, task(client)["id"]), 429, "concurrency_limit")  # without queue: as before

    for freed, starts, left in ((long[0], high, [(mid, 1), (low, 2)]), (long[1], mid, [(low, 1)]), (high, low, [])):
        client.post(f"/tasks/{freed}/cancel")
        wait_status(client, starts, "running")
        assert queue_order(client) == left
        assert client.get(f"/tasks/{starts}").json()["queuePosition"] is None
    assert started_order(client, [low, high, mid]) == [high, mid, low]
    assert client.get("/overview").json()["tasks"]["queued"] == 0

    runs = client.get(f"/tasks/{low}/runs").json()
    assert [(r["number"], r["status"], r["desktopId"]) for r in runs] == [(1, "running", "local")]
    assert runs[0]["queuedAt"] < runs[0]["startedAt"]


def test_a_priority_patched_while_queued_moves_the_task(limited):
    client = limited.client()
    for n in range(2):
        run(client, task(client, f"long {n}", metadata=LONG)["id"])
    first, second = task(client, "first")["id"], task(client, "second")["id"]
    queued(client, first)
    queued(client, second)
    assert queue_order(client) == [(first, 1), (second, 2)]

    moved = client.patch(f"/tasks/{second}", json={"priority": 8})
    assert moved.status_code == 200, moved.text
    assert (moved.json()["priority"], moved.json()["queuePosition"]) == (8, 1)
    assert queue_order(client) == [(second, 1), (first, 2)]
    refused(client.patch(f"/tasks/{first}", json={"content": "else"}), 409, "invalid_status", ("queued",))


def test_cancel_retry_and_delete_of_a_queued_task(limited):
    client = limited.client()
    long = [task(client, f"long {n}", metadata=LONG)["id"] for n in range(2)]
    for task_id in long:
        run(client, task_id)
    kept, cancelled, deleted = (task(client, name)["id"] for name in ("kept", "cancelled", "deleted"))
    for task_id in (kept, cancelled, deleted):
        queued(client, task_id)

    refused(client.post(f"/tasks/{kept}/retry"), 409, "invalid_status", ("queued",))  # it has not failed
    refused(run(client, kept, queue=True), 409, "invalid_status")  # queued already
    answer = client.post(f"/tasks/{cancelled}/cancel", json={"reason": "not needed"})
    assert answer.status_code == 200, answer.text
    assert (answer.json()["status"], answer.json()["queuePosition"]) == ("cancelled", None)
    assert client.delete(f"/tasks/{deleted}").status_code == 204
    gone = client.get(f"/tasks/{deleted}").json()
    assert (gone["archived"], gone["status"]) == (True, "cancelled")
    assert queue_order(client) == [(kept, 1)]

    runs = client.get(f"/tasks/{cancelled}/runs").json()
    assert [(r["status"], r["startedAt"], r["error"]) for r in runs] == [("cancelled", None, "cancelled: not needed")]
    assert runs[0]["queuedAt"] is not None and runs[0]["endedAt"] is not None
    retried = client.post(f"/tasks/{cancelled}/retry")
    assert retried.status_code == 200 and retried.json()["status"] == "pending"

    client.post(f"/tasks/{long[0]}/cancel")
    wait_status(client, kept, "done")
    assert status(client, cancelled) == "pending" and status(client, deleted) == "cancelled"


def test_a_run_that_waits_past_its_queue_timeout_fails_queue_timeout(limited):
    client = limited.client()
    for n in range(2):
        run(client, task(client, f"long {n}", metadata=LONG)["id"])
    waiting = task(client, "waiting")["id"]
    refused(run(client, waiting, queueTimeoutSeconds=1), 400)  # only for a run that queues
    queued(client, waiting, queueTimeoutSeconds=1)

    failed = wait_status(client, waiting, "failed")
    assert "queue" in failed["error"]
    runs = client.get(f"/tasks/{waiting}/runs").json()
    assert [(r["status"], r["reason"], r["startedAt"]) for r in runs] == [("failed", "queue_timeout", None)]
    assert queue_order(client) == []


def test_a_run_queued_for_a_desktop_that_is_not_online_waits_and_does_not_block_the_others(limited):
    client = limited.client()
    elsewhere = task(client, "elsewhere", desktopId="elsewhere", priority=10)["id"]
    refused(run(client, elsewhere), 503, "desktop_unavailable")  # without queue: as before
    assert queued(client, elsewhere)["queuePosition"] == 1
    here = task(client, "here")["id"]
    assert run(client, here, queue=True).status_code == 200  # a slot and a desktop free: at once
    wait_status(client, here, "done")
    assert queue_order(client) == [(elsewhere, 1)]


def test_a_chain_queued_at_once_runs_in_dependency_order_each_given_its_upstream_deliverable(limited):
    client = limited.client()
    first = task(client, "first step")["id"]
    second = task(client, "second step", dependsOn=[first])["id"]
    third = task(client, "third step", dependsOn=[second])["id"]
    refused(run(client, third), 409, "dependency_not_done")  # without queue: as before
    answers = [run(client, task_id, queue=True) for task_id in (third, second, first)]
    assert [a.status_code for a in answers] == [202, 202, 200]

    done = wait_status(client, third, "done")
    assert done["result"] == "first step\n\nsecond step\n\nthird step"
    assert wait_status(client, second, "done")["result"] == "first step\n\nsecond step"
    assert started_order(client, [first, second, third]) == [first, second, third]


def test_when_the_first_of_a_queued_chain_fails_the_others_fail_dependency_failed(limited):
    client = limited.client()
    first = task(client, "first", metadata={"echo": {"fail": "no luck", "delayMs": 300}})["id"]
    second = task(client, "second", dependsOn=[first])["id"]
    third = task(client, "third", dependsOn=[second])["id"]
    for task_id in (third, second, first):
        run(client, task_id, queue=True)

    for task_id in (second, third):
        failed = wait_status(client, task_id, "failed")
        assert failed["startedAt"] is None
        assert [r["reason"] for r in client.get(f"/tasks/{task_id}/runs").json()] == ["dependency_failed"]
    assert status(client, first) == "failed"
    assert client.get("/overview").json()["tasks"]["running"] == 0
    assert started_order(client, [first, second, third]) == [first]
    # A dependency that will never be done refuses a queued run at once: it would wait for ever.
    refused(run(client, task(client, "later", dependsOn=[first])["id"], queue=True), 409, "dependency_not_done",
            ("failed",))
