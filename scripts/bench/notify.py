"""`scripts/bench.py notify`: notification fan-out latency, against the task webhook beside it.

A real `mission-control serve` on loopback (durable SQLite, a fresh data dir) and a receiver on
loopback (a thread of this process). The admin registers a `webhook` device at the receiver; each of
N `echo` tasks also carries a `webhookUrl` there, so one `task.completed` makes one notification
and one task webhook. The tasks are queued at once (`"queue": true`) and run as slots free. A
delivery's latency runs from its cause's append (the `recordedAt` of the `task.completed`, the
server's clock) to the receiver reading the POST (this machine's clock: the same one). Figures:
p50 and p99 of each, and the ratio notification / webhook (near 1: the fan-out's decision, made
in the append's own fold, costs the delivery nothing it can see).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from events import parse_rfc3339
from tests.api_helpers import wait_for
from tests.server import Server

from .common import command, line


class _Receiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.arrived: dict[str, list[tuple[float, bytes]]] = {"/device": [], "/task": []}
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    server: _Receiver

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        at = time.time()
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.arrived[self.path].append((at, body))
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()


@command(
    "notify", "notification fan-out latency (cause appended -> receiver has the POST), p50/p99, against task webhooks",
    (("--tasks",), {"type": int, "default": 300, "help": "how many tasks, each one notification (default 300)"}),
)
def notify(args) -> None:
    receiver = _Receiver()
    threading.Thread(target=receiver.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    env = {"MC_WEBHOOK_ALLOW": "127.0.0.0/8", "MC_RATE_LIMIT_PER_SECOND": 0}
    try:
        with tempfile.TemporaryDirectory(prefix="mc-bench-notify-") as tmp, Server(Path(tmp) / "data", env).start() as server:
            notified, hooked = _drive(server, receiver, args.tasks)
    finally:
        receiver.shutdown()
        receiver.server_close()
    print(f"notify: {args.tasks:,} echo tasks, each one notification (a webhook device) and one task webhook")
    for label, latencies in (("notification", notified), ("task webhook", hooked)):
        line(f"{label}: cause -> received p50", f"{statistics.median(latencies):.1f} ms", f"({len(latencies):,})")
        line(f"{label}: cause -> received p99", f"{_p99(latencies):.1f} ms", f"(max {max(latencies):.1f} ms)")
    line("ratio notification / webhook p50", f"{statistics.median(notified) / statistics.median(hooked):.2f}x")


def _drive(server: Server, receiver: _Receiver, count: int) -> tuple[list[float], list[float]]:
    client = server.client(timeout=60)
    device = {"deviceId": "bench", "kind": "webhook", "url": receiver.url + "/device", "events": ["task.completed"]}
    assert client.post("/devices", json=device).status_code == 201
    for n in range(count):
        task = client.post("/tasks", json={"type": "prompt", "content": f"notify {n}", "webhookUrl": receiver.url + "/task"})
        assert client.post(f"/tasks/{task.json()['id']}/run", json={"queue": True}).status_code in (200, 202)
    wait_for(lambda: all(len(got) >= count for got in receiver.arrived.values()), 600, "every delivery")
    completed = {}  # task id -> when its task.completed was appended (epoch seconds)
    after = 0
    while page := client.get("/events", params={"after": after, "types": "task.completed", "limit": 5000}).json()["events"]:
        completed |= {e["payload"]["taskId"]: parse_rfc3339(e["recordedAt"]).timestamp() for e in page}
        after = page[-1]["position"]
    return _latencies(receiver.arrived["/device"], completed), _latencies(receiver.arrived["/task"], completed)


def _latencies(arrived: list[tuple[float, bytes]], completed: dict[str, float]) -> list[float]:
    found = []
    for at, body in arrived:
        sent = json.loads(body)
        task_id = sent.get("taskId") or sent["id"]  # a notification names it; a task webhook is the task
        found.append((at - completed[task_id]) * 1000)
    return sorted(found)


def _p99(values: list[float]) -> float:
    return values[int(0.99 * (len(values) - 1))]
