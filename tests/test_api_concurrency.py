"""The concurrency limit as a global invariant: 50 simultaneous runs against a limit of 5."""


import threading

import httpx

from projections.lifecycle import ACTIVE
from tests.api_helpers import UNLIMITED, Fold, read_log, refused

LIMIT = 5
RACERS = 50


def test_fifty_simultaneous_runs_admit_exactly_the_limit(make_app_server):
    api = make_app_server(MC_MAX_CONCURRENT=str(LIMIT), **UNLIMITED)
    c = api.client()
    # Runs that last 10 s: every admitted run still holds its slot when the race is over.
    ids = []
    for n in range(RACERS):
        response = c.post("/tasks", json={"type": "prompt", "content": f"racer {n}",
                                          "metadata": {"echo": {"delayMs": 10_000}}})
        assert response.status_code == 201
        ids.append(response.json()["id"])

    # One client per racer, each warmed up beforehand, released together.
    clients = [api.client() for _ in ids]
    for client in clients:
        assert client.get("/overview").status_code == 200
    gate = threading.Barrier(RACERS)
    answers: dict[str, httpx.Response] = {}

    def race(client: httpx.Client, task_id: str) -> None:
        gate.wait()
        answers[task_id] = client.post(f"/tasks/{task_id}/run")

    threads = [threading.Thread(target=race, args=pair) for pair in zip(clients, ids)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    statuses = sorted(a.status_code for a in answers.values())
    assert statuses == [200] * LIMIT + [429] * (RACERS - LIMIT), statuses
    admitted = [task_id for task_id, a in answers.items() if a.status_code == 200]
    for task_id, answer in answers.items():
        if answer.status_code == 200:
            assert answer.json()["status"] == "running"
            continue
        body = refused(answer, 429, "concurrency_limit")
        assert body["detail"] == f"Maximum concurrent tasks ({LIMIT}) reached"
        assert int(answer.headers["retry-after"]) > 0
        refused_task = c.get(f"/tasks/{task_id}").json()
        assert refused_task["status"] == "pending" and refused_task["version"] == 1  # nothing appended for it

    overview = c.get("/overview").json()
    assert overview["tasks"]["running"] + overview["tasks"]["awaiting_input"] == LIMIT
    assert overview["maxConcurrent"] == LIMIT

    # Fold the whole log: at no position were more than LIMIT tasks running or awaiting input.
    fold = Fold()
    active, most = 0, 0
    events, _ = read_log(c)
    for recorded in events:
        task_id = _task_of(recorded)
        was = fold.tasks.get(task_id).status if task_id in fold.tasks else None
        fold.apply(recorded)
        now = fold.tasks[task_id].status if task_id in fold.tasks else None
        active += (now in ACTIVE) - (was in ACTIVE)
        most = max(most, active)
        assert active <= LIMIT, f"{active} tasks active at position {recorded.position}"
    assert most == LIMIT
    assert sorted(t.id for t in fold.tasks.values() if t.status in ACTIVE) == sorted(admitted)

    # Cancelling frees the slots at once; a task refused before is admitted now.
    for task_id in admitted:
        assert c.post(f"/tasks/{task_id}/cancel").json()["status"] == "cancelled"
    late = next(task_id for task_id in ids if task_id not in admitted)
    assert c.post(f"/tasks/{late}/run").status_code == 200
    assert c.post(f"/tasks/{late}/cancel").status_code == 200


def _task_of(recorded) -> str | None:
    kind, _, ident = recorded.stream.partition("-")
    return ident if kind == "task" else None
