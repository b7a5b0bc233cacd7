"""Every promise of one server, held by two `serve` processes on one log (issue 15), on both
backends: the concurrency limit, `If-Match` and idempotency keys checked globally, a read on one
node reflecting every write the other acknowledged before it, revocation effective at once on
both, and the activity stream resumed on one node with the id the other gave."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import rfc8785

from events import GENESIS_HASH

from tests.api_helpers import refused_once_revoked
from tests.server import API, Nodes, Server, cli
from tests.test_nodes import nodes  # noqa: F401  (the fixture, on both backends)

ASKING = {"echo": {"ask": "Which colour?"}}
"""An echo run that asks and waits for its answer: it holds a slot (awaiting_input) for good."""


def two(nodes: Nodes, **env) -> tuple[Server, Server]:
    return nodes.start(0, **env), nodes.start(1, **env)


def created(node: Server, **fields) -> dict:
    answer = node.client().post("/tasks", json={"type": "prompt", "content": "race", **fields})
    assert answer.status_code == 201, answer.text
    return answer.json()


def test_thirty_runs_raced_over_two_nodes_admit_exactly_the_limit(nodes):
    a, b = two(nodes, MC_MAX_CONCURRENT="5")
    for round_ in range(3):  # a race is won by chance now and then: several make a lost one show
        tasks = [created(a, metadata=ASKING) for _ in range(30)]
        start = threading.Barrier(30)

        def run(n: int) -> int:
            node = (a, b)[n % 2]
            with httpx.Client(base_url=node.base_url + API, timeout=30,
                              headers={"Authorization": f"Bearer {node.admin_token}"}) as client:
                start.wait(timeout=30)
                return client.post(f"/tasks/{tasks[n]['id']}/run").status_code

        with ThreadPoolExecutor(30) as pool:
            statuses = list(pool.map(run, range(30)))
        assert sorted(statuses) == [200] * 5 + [429] * 25, round_
        assert b.client().get("/overview").json()["tasks"]["pending"] == 25 * (round_ + 1)
        for task, status in zip(tasks, statuses):
            if status == 200:  # its slot is given back for the next round
                assert (a, b)[round_ % 2].client().post(f"/tasks/{task['id']}/cancel").status_code == 200
    assert len(a.client().get("/events", params={"types": "task.started"}).json()["events"]) == 15


def test_if_match_is_checked_on_every_node_against_the_one_log(nodes):
    a, b = two(nodes)
    for round_ in range(10):
        task = created(a)
        version = task["version"]
        start = threading.Barrier(2)

        def patch(node: Server) -> int:
            client = node.client()
            start.wait(timeout=30)
            return client.patch(f"/tasks/{task['id']}", json={"title": node.data_dir.name},
                                headers={"If-Match": f'"{version}"'}).status_code

        with ThreadPoolExecutor(2) as pool:
            statuses = sorted(pool.map(patch, (a, b)))
        assert statuses == [200, 412], (round_, statuses)
        assert b.client().get(f"/tasks/{task['id']}").json()["version"] == version + 1


def test_one_idempotency_key_used_on_two_nodes_at_once_creates_one_task(nodes):
    a, b = two(nodes)
    for round_ in range(10):
        key = f"create-{round_}"
        start = threading.Barrier(2)

        def post(node: Server) -> httpx.Response:
            client = node.client()
            start.wait(timeout=30)
            return client.post("/tasks", json={"type": "prompt", "content": "once"}, headers={"Idempotency-Key": key})

        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(post, (a, b)))
        assert [answer.status_code for answer in answers] == [201, 201], [answer.text for answer in answers]
        assert answers[0].json()["id"] == answers[1].json()["id"]
    created_events = a.client().get("/events", params={"types": "task.created"}).json()["events"]
    assert len(created_events) == 10


def test_a_read_on_one_node_reflects_every_write_the_other_acknowledged(nodes):
    a, b = two(nodes)
    for n in range(25):
        task = created(a, title=f"first {n}")
        read = b.client().get(f"/tasks/{task['id']}")
        assert read.status_code == 200 and read.json()["title"] == f"first {n}"
        changed = b.client().patch(f"/tasks/{task['id']}", json={"title": f"second {n}"})
        assert changed.status_code == 200
        assert a.client().get(f"/tasks/{task['id']}").json() == changed.json()
    assert b.client().get("/overview").json()["tasks"]["pending"] == 25


def test_a_key_revoked_through_one_node_is_refused_by_every_node_within_a_second(nodes):
    a, b = two(nodes)
    issued = cli(nodes.data_dir(0), "token", "create", "--user", "carol", "--scopes", "task:read", env=nodes.env)
    token = issued.stdout.strip().splitlines()[-1]
    key_id = issued.stdout.split()[1]  # "key <id> for carol with ..."
    for node in (a, b):  # each node now knows the key (and may remember it)
        assert node.client(token).get("/tasks").status_code == 200
    cli(nodes.data_dir(0), "token", "revoke", key_id, env=nodes.env)
    revoked = time.monotonic()
    for node in (b, a):
        answer = refused_once_revoked(lambda: node.client(token).get("/tasks"), revoked)  # noqa: B023 (called at once)
        assert answer.status_code == 401 and "revoked" in answer.json()["detail"]


def sse_events(node: Server, last_event_id: int, until: int) -> list[int]:
    """Positions read from `node`'s activity stream after `last_event_id`, up to `until`."""
    got: list[int] = []
    headers = {"Authorization": f"Bearer {node.admin_token}", "Last-Event-ID": str(last_event_id)}
    with httpx.stream("GET", f"{node.base_url}{API}/activity/stream", headers=headers, timeout=30) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                got.append(json.loads(line[len("data: "):])["position"])
                if got[-1] >= until:
                    return got
    raise AssertionError(f"the stream ended at {got[-1:]}, before {until}")


def test_a_stream_resumed_on_the_other_node_gets_exactly_the_rest_while_both_append(nodes):
    a, b = two(nodes)
    writes = 40

    def write(node: Server) -> None:
        client = node.client()
        for n in range(writes):
            assert client.post("/tasks", json={"type": "prompt", "content": f"w{n}"}).status_code == 201

    writers = [threading.Thread(target=write, args=(node,)) for node in (a, b)]
    for writer in writers:
        writer.start()
    first = sse_events(a, 0, 20)  # on A, then the connection drops
    for writer in writers:
        writer.join(timeout=60)
    head = a.client().get("/events").json()["head"]
    rest = sse_events(b, first[-1], head)  # resumed on B with the id A gave
    assert first + rest == list(range(1, head + 1))
    assert chained(a) == chained(b) == head  # one chain, whichever node serves it


def chained(node: Server) -> int:
    """The head up to which the node's log chains, checked on the events exactly as it serves them
    with an RFC 8785 library nobody here wrote, and the node's own /audit/verify agreeing."""
    client, previous, position = node.client(), GENESIS_HASH, 0
    while True:
        page = client.get("/events", params={"after": position, "limit": 5000}).json()
        for served in page["events"]:
            stored = served.pop("hash")
            previous = hashlib.sha256(bytes.fromhex(previous) + rfc8785.dumps(served)).hexdigest()
            position += 1
            assert (served["position"], stored) == (position, previous)
        if not page["events"]:
            break
    verified = client.get("/audit/verify").json()
    assert (verified["ok"], verified["head"]) == (True, position)
    return position
