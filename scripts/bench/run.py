"""`scripts/bench.py run`: shell tasks of `echo` through the HTTP API at the concurrency limit.

A real `mission-control serve` on loopback (durable SQLite, a fresh data dir) and one client
process. The tasks are created first; then as many runs as the server admits are kept in flight:
each `POST /tasks/{id}/run` starts the clock of its task, and its `task.completed`, as the
activity stream delivers it, stops it. Figures: tasks/s over the whole drive, and the run →
done latency (p50, p99, max).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from tests.server import API, Server

from .common import command


@command(
    "run", "1,000 shell tasks of `echo` through the API at the concurrency limit: tasks/s, run -> done p50/p99",
    (("--tasks",), {"type": int, "default": 1000, "help": "how many shell tasks (default 1,000)"}),
    (("--limit",), {"type": int, "default": 5, "help": "the server's MC_MAX_CONCURRENT (default 5, the API's)"}),
)
def run(args) -> None:
    with tempfile.TemporaryDirectory(prefix="mc-bench-run-") as tmp:
        # One client making 1,000 tasks as fast as it can: the per-key rate limit is not what is measured.
        with Server(Path(tmp) / "data", {"MC_MAX_CONCURRENT": args.limit, "MC_RATE_LIMIT_PER_SECOND": 0}).start() as server:
            asyncio.run(_drive(server, args.tasks, args.limit))


async def _drive(server: Server, count: int, limit: int) -> None:
    headers = {"Authorization": f"Bearer {server.admin_token}"}
    async with httpx.AsyncClient(base_url=server.base_url + API, headers=headers, timeout=60) as client:
        agent = (await client.post("/agents", json={"name": "bench-shell", "kind": "shell"})).json()["id"]
        began = time.perf_counter()
        ids = []
        for n in range(count):
            created = await client.post("/tasks", json={"type": "command", "content": f"echo {n}"})
            ids.append(created.json()["id"])
        created_in = time.perf_counter() - began
        head = (await client.get("/events", params={"limit": 1})).json()["head"]

        ended: dict[str, asyncio.Future] = {task_id: asyncio.get_running_loop().create_future() for task_id in ids}
        listening = asyncio.Event()
        listener = asyncio.create_task(_listen(client, head, ended, listening))
        await listening.wait()

        latencies: list[float] = []
        refused = 0
        queue = list(reversed(ids))
        rss = psutil.Process(server.process.pid)  # the server process: its memory and CPU
        peak = rss.memory_info().rss

        async def worker() -> None:
            nonlocal refused, peak
            while queue:
                task_id = queue.pop()
                while True:
                    sent = time.perf_counter()
                    answer = await client.post(f"/tasks/{task_id}/run", json={"agentId": agent})
                    if answer.status_code != 429:  # a slot frees when the log says so: try again
                        break
                    refused += 1
                    await asyncio.sleep(0.005)
                assert answer.status_code == 200, answer.text
                kind = await ended[task_id]
                assert kind == "task.completed", f"task {task_id} ended with {kind}"
                latencies.append(time.perf_counter() - sent)
                peak = max(peak, rss.memory_info().rss)

        me = psutil.Process()
        cpu_before, my_cpu_before = sum(rss.cpu_times()[:2]), sum(me.cpu_times()[:2])
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(limit)))
        elapsed = time.perf_counter() - started
        cpu, my_cpu = sum(rss.cpu_times()[:2]) - cpu_before, sum(me.cpu_times()[:2]) - my_cpu_before
        listener.cancel()

    latencies.sort()
    ms = [x * 1000 for x in latencies]
    print(f"run: {count:,} shell tasks of `echo` at the concurrency limit ({limit}), one server on loopback")
    print(f"  {'created (not timed below)':<34}{count / created_in:>12,.0f} tasks/s")
    print(f"  {'run -> done throughput':<34}{count / elapsed:>12,.1f} tasks/s   ({elapsed:.2f} s)")
    print(f"  {'run -> done latency p50':<34}{statistics.median(ms):>12.1f} ms")
    print(f"  {'run -> done latency p99':<34}{ms[int(0.99 * (len(ms) - 1))]:>12.1f} ms")
    print(f"  {'run -> done latency max':<34}{ms[-1]:>12.1f} ms")
    print(f"  {'429 answers (retried)':<34}{refused:>12,}")
    print(f"  {'server CPU per task':<34}{cpu / count * 1000:>12.1f} ms   ({cpu / elapsed:.0%} of a core)")
    print(f"  {'client CPU per task':<34}{my_cpu / count * 1000:>12.1f} ms   ({my_cpu / elapsed:.0%} of a core)")
    print(f"  {'server peak RSS':<34}{peak / 2**20:>12.1f} MiB")
    print(f"  {'load average (1 min) at the end':<34}{psutil.getloadavg()[0]:>12.2f}      ({psutil.cpu_count()} cores)")


async def _listen(client: httpx.AsyncClient, after: int, ended: dict, listening: asyncio.Event) -> None:
    """Resolves each task's future with the type of the event that ended its run."""
    params = {"after": after, "types": "task.completed,task.failed,task.cancelled"}
    async with client.stream("GET", "/activity/stream", params=params, timeout=None) as response:
        listening.set()
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                future = ended.get(event["payload"]["taskId"])
                if future is not None and not future.done():
                    future.set_result(event["type"])
