"""Twenty workers on one server, which runs nothing itself: every run is placed on one of them,
the concurrency limit holds across them all and each desktop's capacity on it, at every position
of the log."""

from __future__ import annotations

import concurrent.futures
import contextlib
import signal
import time

import msgspec

from tests.api_helpers import UNLIMITED, read_log, wait_for
from tests.worker import Worker, echo_agent, worker_keys

WORKERS, RUNS, LIMIT = 20, 200, 5
ENDINGS = {"task.completed", "task.failed", "task.cancelled"}


def test_twenty_workers_share_the_runs_within_the_limit_and_their_capacities(make_server, tmp_path):
    server = make_server(MC_NO_LOCAL_DESKTOP="1", MC_MAX_CONCURRENT=str(LIMIT), **UNLIMITED)
    client = server.client()
    names = [f"w{n:02}" for n in range(WORKERS)]
    keys = worker_keys(server, names)
    with contextlib.ExitStack() as stack:
        workers = [Worker(server, name, tmp_path / name, token=keys[name][1]).spawn() for name in names]
        for worker in workers:
            stack.callback(worker.stop)
        stack.callback(lambda: [worker.send(signal.SIGTERM) for worker in workers])  # all drain at once, first
        for worker in workers:  # they register at once
            worker.wait_ready(60)
        agent = echo_agent(client, "echo-many")

        def run(n: int) -> str:
            with server.client() as own:
                task_id = own.post("/tasks", json={"type": "prompt", "content": f"run {n}"}).json()["id"]
                for _ in range(2000):
                    started = own.post(f"/tasks/{task_id}/run", json={"agentId": agent})
                    if started.status_code != 429:  # the limit, or every desktop full: again
                        assert started.status_code == 200, started.text
                        return task_id
                    time.sleep(0.05)
                raise AssertionError(f"run {n} was refused 429 2000 times")

        with concurrent.futures.ThreadPoolExecutor(LIMIT + 2) as pool:  # a few more than may run
            task_ids = set(pool.map(run, range(RUNS)))

        seen = {"after": 0, "ended": 0}

        def all_ended() -> bool:
            events, seen["after"] = read_log(client, seen["after"])
            seen["ended"] += sum(e.type in ENDINGS for e in events)
            return seen["ended"] >= RUNS

        wait_for(all_ended, 60, f"{RUNS} runs to end")

    events, _ = read_log(client)
    active: dict[str, str] = {}  # task -> the desktop its run is on
    started, finished, desktops = [], [], set()
    for event in events:
        if event.type != "task.started" and event.type not in ENDINGS:
            continue
        payload = msgspec.json.decode(event.payload)
        task_id, where = payload["taskId"], f"at position {event.position}"
        if event.type == "task.started":
            assert task_id not in active, f"task {task_id} started again {where}"
            active[task_id] = payload["desktopId"]
            started.append(task_id)
            desktops.add(payload["desktopId"])
            assert len(active) <= LIMIT, f"{len(active)} runs active {where}"
            on_it = list(active.values()).count(payload["desktopId"])
            assert on_it <= 1, f"{on_it} runs on desktop {payload['desktopId']}, of capacity 1, {where}"
        else:
            assert event.type == "task.completed", (event.type, payload)
            assert active.pop(task_id, None) is not None, f"task {task_id} ended without a run {where}"
            finished.append(task_id)
    assert sorted(started) == sorted(finished) == sorted(task_ids)  # each started once, ended once
    assert len(desktops) > 1 and desktops <= set(names), desktops
