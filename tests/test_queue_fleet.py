"""The queue on real servers (issue 19): queued runs over several desktops checked against a fold of
the log, a kill -9 with runs queued, a lowered MC_MAX_CONCURRENT, and two nodes on one database
both dispatching."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events import RecordedEvent, decode
from events import types as t
from projections.desktops import Placement
from projections.lifecycle import ACTIVE
from projections.tasks import TaskState
from service.commands.deciders import Refused, place
from tests.api_helpers import UNLIMITED, Fold, read_log, wait_for
from tests.test_nodes import nodes  # noqa: F401  (the fixture)
from tests.worker import Worker, worker_keys

LIMIT = 3
WORKERS = {"w1": 1, "w2": 2}
"""Desktop name to capacity, beside the server's own `local` (capacity LIMIT)."""
ENDED = ("done", "failed", "cancelled")


def rank(task: TaskState) -> tuple[int, int]:
    return -task.priority, task.queued_position


def placements(fold: Fold) -> list[Placement]:
    busy: dict[str, int] = {}
    for task in fold.tasks.values():
        if task.status in ACTIVE and task.run_desktop_id is not None:
            busy[task.run_desktop_id] = busy.get(task.run_desktop_id, 0) + 1
    return [Placement(id=d.id, status=d.status, agents=list(d.agents), capacity=d.capacity, busy=busy.get(d.id, 0),
                      epoch=d.epoch) for d in fold.desktops.values()]


def placeable(task: TaskState, desktops: list[Placement]) -> bool:
    try:
        place(task.desktop_id, "echo", desktops)
    except Refused:
        return False
    return True


def _described(task: TaskState) -> str:
    return f"{task.id} ({task.status}, priority {task.priority}, desktop {task.desktop_id}, queued {task.queued_position})"


def check_starts(events: list[RecordedEvent], limit: int) -> dict[str, int]:
    """Folds the log and checks every start against the state just before it: a run slot was free,
    and no queued task that could have taken it was passed over (one ahead in queue order, or any
    at all for a run started at once: queued runs come first). Returns the starts of each task."""
    fold = Fold()
    starts: dict[str, int] = {}
    for recorded in events:
        if recorded.type == "task.started":
            data = decode(recorded)
            assert isinstance(data, t.TaskStarted)
            starting = fold.tasks[data.task_id]
            active = sum(task.status in ACTIVE for task in fold.tasks.values())
            assert active < limit, f"position {recorded.position}: a start with {active} of {limit} slots taken"
            desktops = placements(fold)
            passed_over = [
                task.id for task in fold.tasks.values()
                if task.status == "queued" and task.id != starting.id
                and (starting.status != "queued" or rank(task) < rank(starting)) and placeable(task, desktops)
            ]
            assert not passed_over, (
                f"position {recorded.position}: {_described(starting)} started on {data.desktop_id} before "
                f"{[_described(fold.tasks[p]) for p in passed_over[:3]]} ({len(passed_over)} in all), with {desktops}")
            starts[data.task_id] = starts.get(data.task_id, 0) + 1
        fold.apply(recorded)
    return starts


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A server with LIMIT run slots and workers w1 and w2 beside its own desktop, all hosting echo."""
    from tests.server import Server

    tmp = tmp_path_factory.mktemp("fleet")
    server = Server(tmp / "data", {"MC_MAX_CONCURRENT": str(LIMIT), **UNLIMITED}).start()
    keys = worker_keys(server, list(WORKERS))
    workers = [Worker(server, name, tmp / name, capacity=capacity, token=keys[name][1]).spawn()
               for name, capacity in WORKERS.items()]
    try:
        for worker in workers:
            worker.wait_ready(60)
        yield server
    finally:
        for worker in workers:
            worker.stop()
        server.stop()


PLANS = st.lists(st.tuples(st.integers(1, 10), st.sampled_from([None, "local", *WORKERS])), min_size=200, max_size=200)


@settings(max_examples=2, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(plan=PLANS)
def test_queued_runs_over_several_desktops_each_start_once_within_the_limit_in_priority_order(fleet, plan):
    client = fleet.client()
    before = client.get("/events", params={"limit": 1}).json()["head"]
    ids = []
    for n, (priority, desktop) in enumerate(plan):
        body = {"type": "prompt", "content": f"run {n}", "priority": priority,
                "metadata": {"echo": {"delayMs": 100, "chunks": 1}}}
        if desktop is not None:
            body["desktopId"] = desktop
        ids.append(client.post("/tasks", json=body).json()["id"])
    answers = [client.post(f"/tasks/{task_id}/run", json={"queue": True}) for task_id in ids]
    assert {a.status_code for a in answers} <= {200, 202}, [a.text for a in answers if a.status_code >= 300][:3]

    def all_done() -> bool:
        listed = client.get("/tasks", params={"status": "pending,queued,running", "limit": 1})
        return listed.headers["X-Total-Count"] == "0"

    wait_for(all_done, timeout=180, what="every queued run to end")
    events, _ = read_log(client)
    starts = check_starts(events, LIMIT)
    assert {task_id: starts.get(task_id) for task_id in ids} == {task_id: 1 for task_id in ids}
    done = client.get("/tasks", params={"status": "done", "limit": 500}).json()
    assert set(ids) <= {task["id"] for task in done}
    assert any(e.position > before and e.type == "task.queued" for e in events)


def queue_order(client: httpx.Client) -> list[tuple[str, int]]:
    return [(x["id"], x["queuePosition"]) for x in client.get("/tasks", params={"status": "queued", "sort": "queue"}).json()]


def test_runs_queued_before_a_kill_9_are_queued_after_it_in_the_same_order(make_server):
    server = make_server()
    client = server.client()
    for priority in (3, 7, 3, 10, 1, 7):  # for a desktop that is not online: they wait
        task_id = client.post("/tasks", json={"type": "prompt", "content": f"p{priority}", "priority": priority,
                                              "desktopId": "later"}).json()["id"]
        assert client.post(f"/tasks/{task_id}/run", json={"queue": True, "queueTimeoutSeconds": 3600}).status_code == 202
    order = queue_order(client)
    assert [p for _, p in order] == [1, 2, 3, 4, 5, 6]

    server.kill()
    server.start()
    client = server.client()
    assert queue_order(client) == order
    assert client.get("/overview").json()["tasks"]["queued"] == 6
    first = client.get(f"/tasks/{order[0][0]}").json()
    assert (first["status"], first["priority"], first["queuePosition"]) == ("queued", 10, 1)


def test_a_lowered_limit_lets_queued_runs_start_only_once_running_is_below_it(make_server, tmp_path):
    server = make_server(MC_MAX_CONCURRENT="3", **UNLIMITED)
    client = server.client()
    worker = Worker(server, "far", tmp_path / "far", capacity=3, token=worker_keys(server, ["far"])["far"][1]).start()
    try:
        long = {"type": "prompt", "content": "long", "desktopId": "far", "metadata": {"echo": {"delayMs": 600_000}}}
        holding = [client.post("/tasks", json=long).json()["id"] for _ in range(3)]
        for task_id in holding:
            assert client.post(f"/tasks/{task_id}/run").status_code == 200
        server.stop()  # the runs go on on their worker while the server restarts with one slot
        server.argv = lambda: [*type(server).argv(server), "--accept-settings"]
        server.env["MC_MAX_CONCURRENT"] = "1"
        server.start()
        client = server.client()
        waiting = client.post("/tasks", json={"type": "prompt", "content": "waits"}).json()["id"]
        assert client.post(f"/tasks/{waiting}/run", json={"queue": True}).status_code == 202
        for task_id in holding:
            assert client.post(f"/tasks/{task_id}/cancel").status_code == 200
        wait_for(lambda: client.get(f"/tasks/{waiting}").json()["status"] == "done", what="the queued run to run")
        events, _ = read_log(client)
        starts = check_starts(events, 3)  # the fold checks slots against the old limit...
        assert starts[waiting] == 1
        started_at = next(e.position for e in events if e.type == "task.started" and decode(e).task_id == waiting)
        ends = [e.position for e in events if e.type == "task.cancelled" and decode(e).task_id in holding]
        assert max(ends) < started_at  # ...and the queued run started only once none was running
    finally:
        worker.stop()


def test_two_nodes_on_one_database_both_dispatching_start_each_queued_run_once(nodes):
    first = nodes.start(0, MC_MAX_CONCURRENT="2", **UNLIMITED)
    second = nodes.start(1, MC_MAX_CONCURRENT="2", **UNLIMITED)
    clients = [first.client(), second.client()]
    ids = []
    for n in range(30):
        body = {"type": "prompt", "content": f"run {n}", "priority": 1 + n % 10,
                "metadata": {"echo": {"delayMs": 50, "chunks": 1}}}
        ids.append(clients[n % 2].post("/tasks", json=body).json()["id"])

    def queue(n: int) -> int:
        return clients[n % 2].post(f"/tasks/{ids[n]}/run", json={"queue": True}).status_code

    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # both nodes at once
        assert set(pool.map(queue, range(len(ids)))) <= {200, 202}
    for client in clients:  # every node's read reflects the other's writes
        wait_for(lambda client=client: client.get("/tasks", params={"status": "pending,queued,running", "limit": 1})
                 .headers["X-Total-Count"] == "0", timeout=120, what="every queued run to end")
    events, _ = read_log(clients[0])
    starts = check_starts(events, 2)
    assert {task_id: starts.get(task_id) for task_id in ids} == {task_id: 1 for task_id in ids}
    desktops = {decode(e).desktop_id for e in events if e.type == "task.started"}
    assert desktops == {"node-0", "node-1"}
