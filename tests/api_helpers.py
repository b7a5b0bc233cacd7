"""Helpers shared by the API tests: polling with a deadline, error checks, the log head, and a
fold of the log as a client reads it (GET /events) through the projections' own `evolve`."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, TypeVar

import httpx
import msgspec
import pytest

from events import RecordedEvent, typed
from projections import approvals as approval_model
from projections import desktops as desktop_model
from projections import presence as presence_model
from projections import tasks as task_model
from tests.inprocess import InProcess
from tests.server import Server

T = TypeVar("T")

UNLIMITED = {"MC_RATE_LIMIT_PER_SECOND": "1000000", "MC_RATE_LIMIT_BURST": "1000000"}
"""The per-key rate limit is not under test here, and one admin key polling for runs to settle
could exceed it: these servers raise it out of the way."""


def post_racing(
    server: Server | InProcess, path: str, body: dict | None, key: dict[str, str], clients: int
) -> list[httpx.Response]:
    """The same POST (`body` None: none) from `clients` clients at once, each on its own connection."""
    senders = [server.client() for _ in range(clients)]
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda client: client.post(path, json=body, headers=key), senders))


@pytest.fixture(scope="module")
def api_server(tmp_path_factory):
    """One app in this process per test module, with the rate limit out of the way.
    Afterwards its log must hold no unhandled error: a 500 is always a bug."""
    started = InProcess(tmp_path_factory.mktemp("api") / "data", UNLIMITED).start()
    try:
        yield started
    finally:
        started.stop()
    no_unhandled_errors(started)


def no_unhandled_errors(server: Server | InProcess) -> None:
    """Asserts the server logged no unhandled error: a 500 is always a bug."""
    errors = [line for line in server.output().splitlines() if "unhandled error" in line]
    assert not errors, f"the server logged {len(errors)} unhandled errors, the first: {errors[0][:3000]}"


def wait_for(condition: Callable[[], T], timeout: float = 15.0, what: str = "condition") -> T:
    """Polls until `condition()` is truthy; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


REVOCATION_SECONDS = 1.0
"""API.md: a revoked key is refused by every node within one second (nodes remember keys briefly)."""


def refused_once_revoked(request: Callable[[], httpx.Response], revoked: float | None = None) -> httpx.Response:
    """`request` sent again until a just-revoked key is refused (401), which must happen within
    REVOCATION_SECONDS of `revoked` (a `time.monotonic()`; default now); the refusal."""
    revoked = time.monotonic() if revoked is None else revoked
    while (answer := request()).status_code != 401 and time.monotonic() - revoked < 5:
        time.sleep(0.02)
    late = time.monotonic() - revoked
    assert late <= REVOCATION_SECONDS, f"the revoked key was still served {late:.2f} s after its revocation"
    return answer


def refused(response: httpx.Response, status: int, code: str | None = None, mentions: tuple[str, ...] = ()) -> dict:
    """An API.md error: the status, JSON {detail, code}, a sentence that names what was wrong."""
    assert response.status_code == status, f"{response.status_code} {response.text[:500]}"
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) >= {"detail", "code"}, body
    assert isinstance(body["detail"], str) and body["detail"].strip(), body
    if code is not None:
        assert body["code"] == code, body
    for word in mentions:
        assert word.lower() in body["detail"].lower(), (word, body["detail"])
    return body


def head(client: httpx.Client) -> int:
    """The log head, as GET /events reports it (the admin key may read the log)."""
    response = client.get("/events", params={"limit": 1})
    assert response.status_code == 200, response.text
    return response.json()["head"]


def stream_until(client: httpx.Client, sentinel: str, opened) -> list[dict]:
    """Everything the activity stream sends from the start up to `sentinel`'s task.created;
    `opened()` runs once the stream is open (and creates the sentinel)."""
    got = []
    with client.stream("GET", "/activity/stream", params={"after": 0}) as stream:
        assert stream.status_code == 200
        opened()
        for line in stream.iter_lines():
            if line.startswith("data: "):
                got.append(json.loads(line.removeprefix("data: ")))
                if got[-1]["type"] == "task.created" and got[-1]["payload"]["content"] == sentinel:
                    return got
    raise AssertionError("the stream ended")


def device(client: httpx.Client, device_id: str, **fields) -> dict:
    """Register one of the caller's devices (a browser tab unless `fields` say otherwise), as
    marking presence from it needs."""
    response = client.post("/devices", json={"deviceId": device_id, "kind": "browser", **fields})
    assert response.status_code in (200, 201), response.text
    return response.json()


@contextmanager
def log_unchanged(client: httpx.Client):
    """Asserts that nothing was appended to the log inside the block."""
    before = head(client)
    yield
    assert head(client) == before, "the request appended to the log"


class _Page(msgspec.Struct):
    events: list[RecordedEvent]
    next: int
    head: int


def read_log(client: httpx.Client, after: int = 0) -> tuple[list[RecordedEvent], int]:
    """Every event after `after` through GET /events' paging, and the head it read to."""
    got: list[RecordedEvent] = []
    while True:
        response = client.get("/events", params={"after": after, "limit": 5000})
        assert response.status_code == 200, response.text
        page = msgspec.json.decode(response.content, type=_Page)
        got += page.events
        if not page.events or page.next >= page.head:
            return got, page.head
        after = page.next


class Fold:
    """Tasks, approvals, presence and desktops folded from the log by the same `evolve` the read models use.
    It folds incrementally; since `evolve` is pure, that equals a fresh fold of the same prefix."""

    def __init__(self) -> None:
        self.position = 0
        self.tasks: dict[str, task_model.Task] = {}
        self.approvals: dict[str, approval_model.Approval] = {}
        self.presence: dict[str, presence_model.Presence] = {}
        self.desktops: dict[str, desktop_model.Desktop] = {}

    def apply(self, recorded: RecordedEvent) -> None:
        assert recorded.position == self.position + 1, "the log has a gap"
        self.position = recorded.position
        event = typed(recorded)
        for states, key_of, evolve in (
            (self.tasks, task_model.task_id_of, task_model.evolve),
            (self.approvals, approval_model.approval_id_of, approval_model.evolve),
            (self.presence, presence_model.presence_key_of, presence_model.evolve),
            (self.desktops, desktop_model.desktop_id_of, desktop_model.evolve),
        ):
            key = key_of(event.data)
            if key is not None:
                new = evolve(states.get(key), event)
                if new is None:
                    states.pop(key, None)
                else:
                    states[key] = new

    def catch_up(self, client: httpx.Client) -> int:
        events, log_head = read_log(client, self.position)
        for recorded in events:
            self.apply(recorded)
        return log_head


def as_json(value: Any) -> Any:
    """A Struct as the API would serve it."""
    return msgspec.json.decode(msgspec.json.encode(value))
