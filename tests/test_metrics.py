"""What an operator sees of a running service: Prometheus metrics at /metrics, and one structured
access-log line per request that never carries a key."""

from __future__ import annotations

import json
import threading
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.server import API


def scrape(server, token: str | None = None) -> dict[tuple[str, frozenset], float]:
    """The server's samples, keyed by name and labels."""
    answer = server.http().get("/metrics", headers={"Authorization": f"Bearer {token or server.admin_token}"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(answer.text) for sample in family.samples
    }


def value(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_for(condition, what: str, timeout: float = 15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_metrics_need_the_admin_scope(app_server):
    http, url = app_server.http(), "/metrics"
    assert http.get(url).status_code == 401
    reader = app_server.token("reader", "task:read,audit:read")
    assert http.get(url, headers={"Authorization": f"Bearer {reader}"}).status_code == 403
    assert http.get(url, headers={"Authorization": f"Bearer {app_server.admin_token}"}).status_code == 200


def test_metrics_can_be_made_public(make_app_server):
    public = make_app_server(MC_METRICS_PUBLIC="1")
    answer = public.http().get("/metrics")
    assert answer.status_code == 200
    assert "mc_log_head" in answer.text


def test_metrics_follow_requests_appends_runs_and_subscribers(app_server):
    server = app_server
    client = server.client()
    before = scrape(server)
    task = client.post("/tasks", json={"type": "prompt", "content": "count me"}).json()
    assert client.post(f"/tasks/{task['id']}/run").status_code == 200
    wait_for(lambda: client.get(f"/tasks/{task['id']}").json()["status"] == "done", "the echo run to finish")
    assert client.get("/tasks/not-a-uuid").status_code == 400

    after = scrape(server)
    created = {"method": "POST", "route": "create_task", "status": "201"}
    assert value(after, "mc_http_requests_total", **created) == value(before, "mc_http_requests_total", **created) + 1
    assert value(after, "mc_http_requests_total", method="GET", route="get_task", status="400") == 1
    timed = value(after, "mc_http_request_duration_seconds_count", method="POST", route="run_task")
    assert timed == 1
    assert value(after, "mc_http_request_duration_seconds_bucket", method="POST", route="run_task", le="+Inf") == 1

    # Create, start and what the run recorded after it were appended one after another: three batches at least.
    assert value(after, "mc_log_append_batch_size_count") >= value(before, "mc_log_append_batch_size_count") + 3
    assert value(after, "mc_log_append_batch_size_sum") >= value(after, "mc_log_append_batch_size_count")
    assert value(after, "mc_log_append_batch_seconds_count") == value(after, "mc_log_append_batch_size_count")
    assert value(after, "mc_log_append_batch_seconds_sum") > 0

    assert value(after, "mc_log_head") == client.get("/events", params={"limit": 1}).json()["head"]
    assert value(after, "mc_projection_lag_events") == 0
    assert value(after, "mc_tasks", status="done") == 1
    assert value(after, "mc_tasks", status="pending") == 0
    assert value(after, "mc_run_slots") == 5


def test_stream_subscribers_are_counted_while_connected(app_server):
    server = app_server
    assert value(scrape(server), "mc_stream_subscribers") == 0
    connected = threading.Event()
    stop = threading.Event()

    def listen():
        headers = {"Authorization": f"Bearer {server.admin_token}"}
        with server.http().stream("GET", API + "/activity/stream", headers=headers, timeout=30) as answer:
            connected.set()
            for _ in answer.iter_lines():
                if stop.is_set():
                    return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert connected.wait(10)
    wait_for(lambda: value(scrape(server), "mc_stream_subscribers") == 1, "the subscriber to be counted")
    stop.set()
    server.client().post("/tasks", json={"type": "prompt", "content": "wake the listener"})  # so it sees stop
    listener.join(10)
    wait_for(lambda: value(scrape(server), "mc_stream_subscribers") == 0, "the subscriber to be let go")


def test_one_json_access_line_per_request_and_never_a_key(server):
    secret = server.token("carol", "task:read")
    ids = [f"req-{n}" for n in range(3)]
    for request_id in ids:
        answer = httpx.get(server.base_url + API + "/tasks", headers={
            "Authorization": f"Bearer {secret}", "X-Request-ID": request_id,
        })
        assert answer.headers["x-request-id"] == request_id
    # The stream takes the key in the query; the access line must not repeat it.
    with httpx.stream("GET", f"{server.base_url}{API}/activity/stream?access_token={secret}",
                      headers={"X-Request-ID": "req-stream"}, timeout=10) as answer:
        assert answer.status_code == 200
    httpx.get(server.base_url + API + "/tasks", headers={"Authorization": "Bearer mc_wrong", "X-Request-ID": "req-401"})

    def access_lines():
        lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
        found = {line["request_id"]: line for line in lines if line.get("event") == "request"}
        return found if {*ids, "req-stream", "req-401"} <= found.keys() else None

    found = wait_for(access_lines, "the access lines")
    line = found["req-1"]
    assert (line["method"], line["path"], line["route"], line["status"]) == ("GET", API + "/tasks", "list_tasks", 200)
    assert isinstance(line["ms"], float) and line["level"] == "info" and line["timestamp"].endswith("Z")
    assert found["req-stream"]["path"] == API + "/activity/stream"
    assert found["req-401"]["status"] == 401
    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    assert sum(1 for line in lines if line.get("request_id") == "req-1") == 1
    output = server.output()
    assert secret not in output and "mc_wrong" not in output
    for line in output.splitlines()[3:]:  # after the first admin key and where it listens, printed by `serve` on purpose
        json.loads(line)  # every log line is JSON when the output is not a terminal
