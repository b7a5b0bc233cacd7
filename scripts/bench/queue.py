"""`scripts/bench.py queue`: 1,000 `echo` runs at the concurrency limit, queued by the server or
started by a client that retries on 429, each on a real `mission-control serve` of its own
(durable SQLite, a fresh data dir, its own desktop running the echo agent).

Queued: long runs hold every slot while the 1,000 are queued (`"queue": true`, 202), so all of them
wait; then the long runs are cancelled, and the dispatcher starts the 1,000 as slots free. The
slot-free to next-start latency is read from the log: for each start, the time since the ending
recorded just before it (`recordedAt`, the server's own clock). Retrying: the same 1,000 tasks sent
by CLIENTS concurrent senders, each `POST /tasks/{id}/run` sent again 10 ms after a 429 (a client
more eager than the `Retry-After` it is given). Figures: runs/s, and the server's CPU per run, over
the time from the first request that frees or takes a slot to the last ending, as the activity
stream delivers it.
"""

from __future__ import annotations

import asyncio
import datetime
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from tests.server import API, Server

from .common import command, line
from .run import _listen

BACKOFF_SECONDS = 0.01
CLIENTS = 20
ECHO = {"echo": {"chunks": 1}}


@command(
    "queue", "1,000 echo runs queued at the limit vs started by a client retrying on 429: runs/s, CPU per run, "
    "slot-free -> next-start latency",
    (("--runs",), {"type": int, "default": 1000, "help": "how many echo runs (default 1,000)"}),
    (("--limit",), {"type": int, "default": 5, "help": "the server's MC_MAX_CONCURRENT (default 5, the API's)"}),
)
def queue(args) -> None:
    with tempfile.TemporaryDirectory(prefix="mc-bench-queue-") as tmp:
        env = {"MC_MAX_CONCURRENT": args.limit, "MC_RATE_LIMIT_PER_SECOND": 0}
        with Server(Path(tmp) / "queued", env).start() as server:
            queued = asyncio.run(_queued(server, args.runs, args.limit))
        with Server(Path(tmp) / "retrying", env).start() as server:
            retrying = asyncio.run(_retrying(server, args.runs))
    print(f"queue: {args.runs:,} echo runs at the concurrency limit ({args.limit}), one server on loopback each")
    line("queued (202) behind the long runs", f"{args.runs / queued['queueing']:,.0f} req/s",
         f"({queued['queueing']:.2f} s, not timed below)")
    line("queued: runs/s", f"{args.runs / queued['elapsed']:,.1f}", f"({queued['elapsed']:.2f} s)")
    line("queued: runs/s, queueing included", f"{args.runs / (queued['elapsed'] + queued['queueing']):,.1f}")
    line(f"retrying on 429 ({CLIENTS} senders): runs/s", f"{args.runs / retrying['elapsed']:,.1f}",
         f"({retrying['elapsed']:.2f} s, {retrying['refused']:,} answers 429)")
    line("throughput ratio queued / retrying", f"{retrying['elapsed'] / queued['elapsed']:.2f}x",
         f"(queueing included: {retrying['elapsed'] / (queued['elapsed'] + queued['queueing']):.2f}x)")
    line("queued: server CPU per run", f"{queued['cpu'] / args.runs * 1000:.1f} ms",
         f"(queueing included: {(queued['cpu'] + queued['queueing_cpu']) / args.runs * 1000:.1f} ms)")
    line("retrying: server CPU per run", f"{retrying['cpu'] / args.runs * 1000:.1f} ms")
    latencies = sorted(queued["latencies"])
    line("slot-free -> next-start p50", f"{statistics.median(latencies):.1f} ms", f"({len(latencies):,} starts)")
    line("slot-free -> next-start p99", f"{latencies[int(0.99 * (len(latencies) - 1))]:.1f} ms")


async def _client(server: Server) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.base_url + API, headers={"Authorization": f"Bearer {server.admin_token}"},
                             timeout=60)


async def _tasks(client: httpx.AsyncClient, count: int, **fields) -> list[str]:
    ids = []
    for n in range(count):
        created = await client.post("/tasks", json={"type": "prompt", "content": f"run {n}", "metadata": ECHO, **fields})
        assert created.status_code == 201, created.text
        ids.append(created.json()["id"])
    return ids


async def _listening(client: httpx.AsyncClient, ids: list[str]) -> tuple[dict[str, asyncio.Future], asyncio.Task, int]:
    head = (await client.get("/events", params={"limit": 1})).json()["head"]
    ended = {task_id: asyncio.get_running_loop().create_future() for task_id in ids}
    listening = asyncio.Event()
    listener = asyncio.create_task(_listen(client, head, ended, listening))
    await listening.wait()
    return ended, listener, head


def _cpu(server: Server) -> float:
    return sum(psutil.Process(server.process.pid).cpu_times()[:2])


async def _queued(server: Server, count: int, limit: int) -> dict:
    async with await _client(server) as client:
        holding = [
            (await client.post("/tasks", json={"type": "prompt", "content": "hold",
                                               "metadata": {"echo": {"delayMs": 600_000}}})).json()["id"]
            for _ in range(limit)
        ]
        for task_id in holding:
            assert (await client.post(f"/tasks/{task_id}/run")).status_code == 200
        ids = await _tasks(client, count)
        cpu, began = _cpu(server), time.perf_counter()
        for task_id in ids:
            answer = await client.post(f"/tasks/{task_id}/run", json={"queue": True})
            assert answer.status_code == 202, answer.text
        queueing, queueing_cpu = time.perf_counter() - began, _cpu(server) - cpu
        ended, listener, head = await _listening(client, ids)
        cpu, began = _cpu(server), time.perf_counter()
        for task_id in holding:
            assert (await client.post(f"/tasks/{task_id}/cancel")).status_code == 200
        kinds = await asyncio.gather(*ended.values())
        elapsed, cpu = time.perf_counter() - began, _cpu(server) - cpu
        listener.cancel()
        assert set(kinds) == {"task.completed"}, set(kinds)
        return {"elapsed": elapsed, "cpu": cpu, "queueing": queueing, "queueing_cpu": queueing_cpu,
                "latencies": await _latencies(client, head, set(ids))}


async def _retrying(server: Server, count: int) -> dict:
    async with await _client(server) as client:
        ids = await _tasks(client, count)
        ended, listener, _ = await _listening(client, ids)
        refused = 0
        waiting = list(reversed(ids))

        async def sender() -> None:
            nonlocal refused
            while waiting:
                task_id = waiting.pop()
                while (answer := await client.post(f"/tasks/{task_id}/run")).status_code == 429:
                    refused += 1
                    await asyncio.sleep(BACKOFF_SECONDS)
                assert answer.status_code == 200, answer.text

        cpu, began = _cpu(server), time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(CLIENTS)))
        kinds = await asyncio.gather(*ended.values())
        elapsed, cpu = time.perf_counter() - began, _cpu(server) - cpu
        listener.cancel()
        assert set(kinds) == {"task.completed"}, set(kinds)
        return {"elapsed": elapsed, "cpu": cpu, "refused": refused}


async def _latencies(client: httpx.AsyncClient, after: int, ids: set[str]) -> list[float]:
    """Milliseconds from the ending recorded last before each start of `ids` to that start."""
    latencies: list[float] = []
    last_ending: datetime.datetime | None = None
    params = {"after": after, "limit": 5000, "types": "task.started,task.completed,task.failed,task.cancelled"}
    while True:
        page = (await client.get("/events", params=params)).json()
        for event in page["events"]:
            at = datetime.datetime.fromisoformat(event["recordedAt"].replace("Z", "+00:00"))
            if event["type"] != "task.started":
                last_ending = at
            elif event["payload"]["taskId"] in ids and last_ending is not None:
                latencies.append((at - last_ending).total_seconds() * 1000)
        if not page["events"] or page["next"] >= page["head"]:
            return latencies
        params["after"] = page["next"]
