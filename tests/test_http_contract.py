"""Smaller contract points a hostile client found (issue 12, items 4, 10, 11 and 13): every
refusal a 400 with a sentence that says what was wrong, and the log untouched."""

from __future__ import annotations

import uuid

import json

import pytest
from hypothesis import given, settings, strategies as st

from service.api import schemas
from service.http.bodies import decode_body
from service.http.errors import HttpError

from tests.api_helpers import log_unchanged, refused
from tests.server import API

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def c(shared_app_server):
    return shared_app_server.client()


@pytest.fixture(scope="module")
def task(c):
    answer = c.post("/tasks", json={"type": "prompt", "content": "target"})
    assert answer.status_code == 201
    return answer.json()


DUPLICATES = [
    (b'{"type": "prompt", "type": "command", "content": "ls"}', "type"),
    (b'{"type": "prompt", "content": "x", "metadata": {"a": {"b": 1, "b": 2}}}', "b"),
    (b'{"type": "prompt", "content": "x", "metadata": {"list": [{"k": 1, "k": 1}]}}', "k"),
    (b'{"type": "prompt", "content": "x", "colour": 1, "colour": 2}', "colour"),  # unknown and repeated
    (b'{"type": "prompt", "content": "\\u003a", "type": "command"}', "type"),  # a colon spelled as an escape
    (b'{"type": "prompt", "content": "a:b", "metadata": {"k:": ":", "k:": ":"}}', "k:"),
]


@pytest.mark.parametrize("body, key", DUPLICATES)
def test_a_key_given_twice_anywhere_in_a_body_is_refused(c, body, key):
    with log_unchanged(c):
        refused(c.post("/tasks", content=body, headers=JSON), 400, "invalid_request", (f"'{key}'", "more than once"))


KEYS = st.sampled_from(["a", "b", "a:", ":", "\\u003a", "b\\\\"])
LEAVES = st.one_of(st.integers(-5, 5), st.sampled_from(['"x"', '":"', '"\\u003a"', "true", "null"]))


def _object(children) -> st.SearchStrategy[str]:
    pairs = st.lists(st.tuples(KEYS, children), max_size=4)
    return pairs.map(lambda ps: "{" + ",".join(f'"{k}" : {v}' for k, v in ps) + "}")


JSON_TEXTS = st.recursive(LEAVES.map(str), lambda children: st.one_of(
    _object(children), st.lists(children, max_size=3).map(lambda vs: "[" + ",".join(vs) + "]")), max_leaves=12)


def _repeats_a_key(text: str) -> bool:
    def pairs(ps):
        if len({k for k, _ in ps}) != len(ps):
            raise KeyError
        return dict(ps)
    try:
        json.loads(text, object_pairs_hook=pairs)
    except KeyError:
        return True
    return False


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(metadata=_object(JSON_TEXTS))
def test_the_cheap_duplicate_check_refuses_exactly_the_bodies_that_repeat_a_key(metadata):
    body = ('{"type": "prompt", "content": "x", "metadata": %s}' % metadata).encode()
    try:
        decode_body(body, schemas.CreateTask, 32, 1000)
        refused_as_duplicate = False
    except HttpError as exc:
        refused_as_duplicate = "more than once" in exc.detail
    assert refused_as_duplicate == _repeats_a_key(body.decode())


def test_a_key_given_twice_is_refused_on_commands_too(c, task):
    with log_unchanged(c):
        answer = c.patch(f"/tasks/{task['id']}", content=b'{"title": "a", "title": "b"}', headers=JSON)
        refused(answer, 400, None, ("'title'", "more than once"))


def test_deleting_presence_refuses_a_garbage_body_next_to_a_device_in_the_query(c, task):
    path = f"/tasks/{task['id']}/presence"
    with log_unchanged(c):
        refused(c.request("DELETE", path, params={"deviceId": "d2"}, content=b"garbage\x00", headers=JSON),
                400, "malformed_json")
        refused(c.request("DELETE", path, params={"deviceId": "d2"}, json={"device": "d2"}), 400, None, ("device",))
        refused(c.request("DELETE", path, params={"deviceId": "d2"}, json={"deviceId": "d3"}), 400, None,
                ("differs",))
    # a body that agrees with the query, or none at all, is taken
    assert c.request("DELETE", path, params={"deviceId": "d2"}, json={"deviceId": "d2"}).status_code == 204
    assert c.request("DELETE", path, params={"deviceId": "d2"}).status_code == 204


@pytest.mark.parametrize("path, methods", [
    ("/tasks", {"GET", "HEAD", "POST"}),
    ("/tasks/{task}", {"GET", "HEAD", "PATCH", "DELETE"}),
    ("/tasks/{task}/presence", {"POST", "DELETE"}),
])
def test_405_allow_lists_the_methods_of_every_route_on_the_path(c, task, path, methods):
    answer = c.request("OPTIONS", path.format(task=task["id"]))
    refused(answer, 405, "method_not_allowed")
    assert set(answer.headers["allow"].replace(" ", "").split(",")) == methods


def test_a_lone_surrogate_is_named_not_called_truncated(c):
    for escape in ("\\ud800", "\\udc00", "\\ud800\\ud800"):
        body = b'{"type": "prompt", "content": "a%sb"}' % escape.encode()
        with log_unchanged(c):
            detail = refused(c.post("/tasks", content=body, headers=JSON), 400, "malformed_json")["detail"]
        assert "surrogate" in detail and "truncated" not in detail, detail
    # an escaped backslash before "ud800" is no escape, and a proper pair is a character
    assert c.post("/tasks", content=b'{"type": "prompt", "content": "\\\\ud800"}', headers=JSON).status_code == 201
    made = c.post("/tasks", content=b'{"type": "prompt", "content": "\\ud83d\\ude00"}', headers=JSON)
    assert made.status_code == 201 and made.json()["content"] == "\U0001f600"


def test_exponent_notation_is_refused_without_being_called_a_fraction(c):
    for body, field in ((b'{"type": "prompt", "content": "x", "metadata": {"n": 1E2}}', "metadata.n"),
                        (b'{"type": "prompt", "content": "x", "priority": 1E0}', "priority")):
        with log_unchanged(c):
            detail = refused(c.post("/tasks", content=body, headers=JSON), 400, None, (field, "exponent"))["detail"]
        assert "a fractional number" not in detail


def test_depends_on_naming_a_task_twice_is_refused(c, task):
    with log_unchanged(c):
        refused(c.post("/tasks", json={"type": "prompt", "content": "x", "dependsOn": [task["id"]] * 3}),
                400, None, ("dependsOn", task["id"], "more than once"))
    other = c.post("/tasks", json={"type": "prompt", "content": "x", "dependsOn": [task["id"]]})
    assert other.status_code == 201 and other.json()["dependsOn"] == [task["id"]]


def test_the_ids_the_service_mints_are_random_uuids_in_canonical_form(c):
    ids = [c.post("/tasks", json={"type": "prompt", "content": "x"}).json()["id"] for _ in range(20)]
    assert len(set(ids)) == len(ids)
    for minted in ids:
        assert str(uuid.UUID(minted)) == minted and uuid.UUID(minted).version == 4
        assert c.get(f"/tasks/{minted.upper()}").json()["id"] == minted  # any form of it names the task


def test_a_request_id_over_200_characters_is_replaced_not_cut(shared_app_server, c):
    long_id = "r" * 300
    answer = c.get("/tasks", headers={"X-Request-ID": long_id})
    assert answer.status_code == 200
    minted = answer.headers["x-request-id"]  # a fresh id, not the first 200 of the client's
    assert str(uuid.UUID(minted)) == minted and uuid.UUID(minted).version == 4
    kept = shared_app_server.http().get(API + "/tasks", headers={
        "X-Request-ID": "r" * 200, "Authorization": f"Bearer {shared_app_server.admin_token}"})
    assert kept.headers["x-request-id"] == "r" * 200


@pytest.mark.parametrize("path, name", [
    ("/tasks", "limit"), ("/tasks", "status"), ("/tasks", "search"), ("/tasks/{task}", "asOf"),
    ("/tasks/{task}/output", "runId"), ("/tasks/{task}/events", "after"), ("/approvals", "status"),
    ("/events", "types"), ("/events", "stream"),
])
def test_an_empty_query_value_is_refused_on_every_route(c, task, path, name):
    answer = c.get(path.format(task=task["id"]) + f"?{name}=")
    refused(answer, 400, "invalid_request", (name, "empty"))


def test_a_types_filter_naming_no_event_type_is_refused(c):
    refused(c.get("/events", params={"types": "task.complete"}), 400, None, ("task.complete",))
    assert c.get("/events", params={"types": "task.completed,presence.,agent*"}).status_code == 200


def test_the_openapi_document_states_the_limits_the_server_enforces(shared_app_server):
    document = shared_app_server.http().get("/openapi.json").json()
    components = document["components"]["schemas"]

    def parameter(path: str, method: str, name: str) -> dict:
        return next(p for p in document["paths"][API + path][method]["parameters"] if p["name"] == name)["schema"]

    for path, name in (("/events", "after"), ("/tasks/{task_id}", "asOf"), ("/tasks", "offset")):
        assert parameter(path, "get", name)["maximum"] == 2**63 - 1, name
    assert "W/" in parameter("/tasks/{task_id}", "patch", "If-Match")["pattern"]
    assert "task\\.completed" in parameter("/events", "get", "types")["pattern"]
    assert parameter("/tasks/{task_id}/presence", "delete", "deviceId")["minLength"] == 1
    create = components["CreateTask"]["properties"]
    assert create["content"]["pattern"] == "^[^\\u0000]*$"  # no NUL
    assert create["metadata"]["additionalProperties"] == {"$ref": "#/components/schemas/JsonValue"}
    assert create["dependsOn"]["uniqueItems"] is True
    values = components["JsonValue"]["anyOf"]
    assert {"type": "integer", "minimum": -(2**53 - 1), "maximum": 2**53 - 1} in values
    assert not any(v.get("type") == "number" for v in values)  # no fractions
    openai = next(v for v in components["CreateAgent"]["oneOf"] if v["properties"]["kind"] == {"const": "openai"})
    assert "config" in openai["required"]
    assert {"baseUrl", "model"} <= set(components["OpenAIConfig"]["required"])


def test_a_malformed_if_match_is_bad_input_not_a_failed_precondition(c, task):
    for given in ("", "abc", 'W/"x"'):
        with log_unchanged(c):
            refused(c.patch(f"/tasks/{task['id']}", json={"title": "x"}, headers={"If-Match": given}), 400,
                    "invalid_request", ("If-Match",))
