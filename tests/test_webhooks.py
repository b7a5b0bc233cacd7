"""Webhooks against a real receiver on loopback: signed POSTs of the task at each end state,
retried with backoff under one delivery id, every attempt on the record, and a restart that
resumes what was pending without sending again what was delivered."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import socket
import ssl
import subprocess
import threading
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from collections.abc import Iterator
from typing import NamedTuple

import httpx
import pytest

from events import Meta
from events.types import WebhookAttempted
from projections.readmodels import read_models
from service.settings import Settings, from_env
from service.work.webhooks import STREAM, WebhookWorker
from service.work import outbound
from tests.api_helpers import log_unchanged, refused, wait_for
from tests.server import Server
from tests.test_runner import events, start, until_status

SECRET = "webhook-s3cret"
# The receivers listen on loopback, which a webhook reaches only where the setting admits it.
SETTINGS = {"MC_WEBHOOK_SECRET": SECRET, "MC_WEBHOOK_BACKOFF_SECONDS": "0.2", "MC_WEBHOOK_ALLOW": "127.0.0.0/8"}


class Received(NamedTuple):
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver(ThreadingHTTPServer):
    """Answers 500 to the first `fail_first[path]` requests on a path, and to every request on
    a path in `failing`; 204 otherwise. Keeps every request."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), ReceiverHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.received: list[Received] = []
        self.fail_first: dict[str, int] = {}
        self.failing: set[str] = set()
        self.lock = threading.Lock()

    def got(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]


class ReceiverHandler(BaseHTTPRequestHandler):
    server: Receiver

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.received.append(Received(self.path, dict(self.headers), body))
            seen = sum(1 for r in self.server.received if r.path == self.path)
            fail = self.path in self.server.failing or seen <= self.server.fail_first.get(self.path, 0)
        self.send_response(500 if fail else 204)
        self.send_header("Content-Length", "0")
        self.end_headers()


@contextlib.contextmanager
def receiving() -> Iterator[Receiver]:
    r = Receiver()
    threading.Thread(target=r.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield r
    finally:
        r.shutdown()
        r.server_close()


@pytest.fixture
def receiver():
    with receiving() as r:
        yield r


@pytest.fixture(scope="module")
def mc(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("webhooks") / "data", SETTINGS).start()
    yield s
    s.stop()


def attempts(client: httpx.Client, delivery_id: str | None = None) -> list[dict]:
    page = client.get("/events", params={"types": "webhook.attempted", "limit": 5000})
    assert page.status_code == 200, page.text
    found = page.json()["events"]
    return [e for e in found if delivery_id in (None, e["payload"]["deliveryId"])]


def signed(request: Received) -> bool:
    expected = "sha256=" + hmac.new(SECRET.encode(), request.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(request.headers["X-MC-Signature"], expected)


def seconds_between(earlier: dict, later: dict) -> float:
    at = [datetime.fromisoformat(e["recordedAt"].replace("Z", "+00:00")) for e in (earlier, later)]
    return (at[1] - at[0]).total_seconds()


def test_a_failing_receiver_gets_retries_with_backoff_under_one_signed_delivery(mc, receiver):
    client = mc.client()
    receiver.fail_first["/hook"] = 2
    task = start(client, None, "hello", "prompt", webhookUrl=receiver.url + "/hook")
    done = until_status(client, task["id"], ("done",))

    requests = wait_for(lambda: len(got := receiver.got("/hook")) == 3 and got, what="three attempts")
    (delivery,) = {r.headers["X-MC-Delivery"] for r in requests}
    assert all(signed(r) for r in requests)
    assert {r.headers["X-MC-Event"] for r in requests} == {"task.completed"}
    assert len({r.body for r in requests}) == 1  # the same task JSON, as it stood when it got done
    sent = json.loads(requests[0].body)
    assert (sent["id"], sent["status"], sent["result"], sent["version"]) == (
        task["id"], "done", done["result"], done["version"],
    )

    recorded = wait_for(lambda: len(found := attempts(client, delivery)) == 3 and found, what="three records")
    assert [(e["payload"]["attempt"], e["payload"]["ok"], e["payload"]["statusCode"]) for e in recorded] == [
        (1, False, 500), (2, False, 500), (3, True, 204),
    ]
    assert {(e["stream"], e["payload"]["taskId"]) for e in recorded} == {("webhooks", task["id"])}
    assert seconds_between(recorded[0], recorded[1]) >= 0.2  # the backoff doubles: 0.2 s, then 0.4 s
    assert seconds_between(recorded[1], recorded[2]) >= 0.4
    assert httpx.get(mc.base_url + "/readyz").json()["ready"]  # the read models took the new events in stride


def test_each_end_state_is_delivered(mc, receiver):
    client = mc.client()
    hook = receiver.url
    reviewed = start(client, None, "review me", "prompt", requiresApproval=True, webhookUrl=hook + "/review")
    until_status(client, reviewed["id"], ("review",))
    assert client.post(f"/tasks/{reviewed['id']}/review", json={"decision": "approve"}).status_code == 200
    failed = start(client, None, "fail", "prompt", metadata={"echo": {"fail": "no"}}, webhookUrl=hook + "/failed")
    cancelled = client.post("/tasks", json={"type": "prompt", "content": "x", "webhookUrl": hook + "/cancelled"})
    assert client.post(f"/tasks/{cancelled.json()['id']}/cancel").status_code == 200

    def delivered(path: str, count: int = 1) -> list[tuple[str, str]]:
        got = wait_for(lambda: len(found := receiver.got(path)) == count and found, what=f"{count} on {path}")
        return [(r.headers["X-MC-Event"], json.loads(r.body)["status"]) for r in got]

    assert sorted(delivered("/review", 2)) == [("task.completed", "done"), ("task.review", "review")]
    assert len({r.headers["X-MC-Delivery"] for r in receiver.got("/review")}) == 2  # two deliveries
    assert delivered("/failed") == [("task.failed", "failed")]
    assert delivered("/cancelled") == [("task.cancelled", "cancelled")]
    assert failed["id"] in receiver.got("/failed")[0].body.decode()


def test_each_attempt_names_the_event_that_triggered_its_delivery(mc, receiver):
    client = mc.client()
    receiver.fail_first["/caused"] = 1  # one delivery is attempted twice: a retry names the same cause
    task = start(client, None, "review me", "prompt", requiresApproval=True, webhookUrl=receiver.url + "/caused")
    until_status(client, task["id"], ("review",))
    assert client.post(f"/tasks/{task['id']}/review", json={"decision": "approve"}).status_code == 200
    until_status(client, task["id"], ("done",))

    wait_for(lambda: len(receiver.got("/caused")) == 3, what="two deliveries, one retried")
    recorded = wait_for(lambda: len(found := [e for e in attempts(client) if e["payload"]["taskId"] == task["id"]]) == 3
                        and found, what="three attempts on the record")
    triggers = {e["type"]: e["position"] for e in events(client, task["id"])}
    event_of = {r.headers["X-MC-Delivery"]: r.headers["X-MC-Event"] for r in receiver.got("/caused")}
    causes: dict[str, set] = {}
    for e in recorded:
        causes.setdefault(e["payload"]["deliveryId"], set()).add(e["meta"]["causationId"])
    assert causes == {delivery: {str(triggers[event])} for delivery, event in event_of.items()}
    assert set(event_of.values()) == {"task.review", "task.completed"}


def test_a_restart_resumes_pending_deliveries_and_never_resends_delivered_ones(make_server, receiver):
    first = make_server(**SETTINGS)
    client = first.client()
    receiver.failing.add("/pending")
    pending = start(client, None, "keeps failing", "prompt", webhookUrl=receiver.url + "/pending")
    (tried,) = wait_for(lambda: attempts(client), what="a failed attempt")
    delivery = tried["payload"]["deliveryId"]
    delivered = start(client, None, "gets through", "prompt", webhookUrl=receiver.url + "/delivered")
    wait_for(lambda: any(e["payload"]["ok"] for e in attempts(client)), what="the second delivery")
    first.kill()  # every attempt the first server made at /pending failed
    receiver.failing.discard("/pending")

    client = make_server(first.data_dir, **SETTINGS).client()
    resumed = wait_for(lambda: (found := attempts(client, delivery))[-1]["payload"]["ok"] and found, what="the retry")
    assert [e["payload"]["attempt"] for e in resumed] == list(range(1, len(resumed) + 1))  # the count went on
    assert [e["payload"]["ok"] for e in resumed] == [False] * (len(resumed) - 1) + [True]
    assert {r.headers["X-MC-Delivery"] for r in receiver.got("/pending")} == {delivery}

    later = start(client, None, "after the restart", "prompt", webhookUrl=receiver.url + "/later")
    wait_for(lambda: receiver.got("/later"), what="a delivery after the restart")
    assert len(receiver.got("/delivered")) == 1, "a delivery recorded as delivered was sent again"
    assert pending["id"] != delivered["id"] != later["id"]


@pytest.mark.parametrize("attempts_made", [0, 1, 2, 5, 13])
async def test_a_worker_resumes_from_the_checkpoint_of_the_last_recorded_attempt(log_factory, attempts_made):
    log = await log_factory()
    for n in range(1, attempts_made + 1):
        attempt = WebhookAttempted(
            delivery_id="d", task_id="t", url="http://127.0.0.1:9/", attempt=n, ok=False, checkpoint=100 + n,
        )
        await log.append(STREAM, [attempt], meta=Meta())
    resume = await WebhookWorker(log, read_models(log), Settings())._resume_point()
    assert resume == (100 + attempts_made if attempts_made else 0)


# --- outbound addresses ------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "why"), [
    ("http://127.0.0.1:84139/hook", "port 84139"),  # once delivered to port 84139 - 65536
    ("http://127.0.0.1:0/hook", "port 0"),
    ("http://user:pw@127.0.0.1/hook", "credentials"),  # once sent as Basic auth and kept in the log
    ("http://169.254.169.254/latest/meta-data/", "link-local or cloud-metadata"),
    ("http://[fe80::1%25eth0]/", "link-local or cloud-metadata"),
    ("http://[fd00:ec2::254]/", "link-local or cloud-metadata"),
    ("http://[::ffff:169.254.169.254]/", "link-local or cloud-metadata"),
    ("http://[64:ff9b::a9fe:a9fe]/", "link-local or cloud-metadata"),  # NAT64 of 169.254.169.254
    ("http://10.1.2.3/hook", "MC_WEBHOOK_ALLOW does not admit"),  # private, and not in the setting
    ("http://[::1]/hook", "MC_WEBHOOK_ALLOW does not admit"),
])
def test_a_webhook_url_the_service_never_sends_to_is_refused_at_create(mc, url, why):
    client = mc.client()
    with log_unchanged(client):
        response = client.post("/tasks", json={"type": "prompt", "content": "x", "webhookUrl": url})
    refused(response, 400, mentions=("webhookUrl", why))


def test_a_name_is_checked_at_each_delivery_and_a_refusal_is_a_failed_attempt(make_server, receiver):
    """`localhost` is a name, so only its delivery can tell where it leads: to loopback, which
    this server does not admit; another admits it by that name."""
    port = receiver.server_address[1]
    strict = make_server(**{**SETTINGS, "MC_WEBHOOK_ALLOW": "", "MC_WEBHOOK_ATTEMPTS": "2"})
    client = strict.client()
    start(client, None, "hello", "prompt", webhookUrl=f"http://localhost:{port}/strict")
    tried = wait_for(lambda: len(found := attempts(client)) == 2 and found, what="two refused attempts")
    assert [(e["payload"]["ok"], e["payload"]["statusCode"]) for e in tried] == [(False, None)] * 2
    assert "localhost is at 127.0.0.1, a loopback" in tried[0]["payload"]["error"]
    assert "MC_WEBHOOK_ALLOW does not admit" in tried[0]["payload"]["error"]
    assert receiver.got("/strict") == []

    client = make_server(**{**SETTINGS, "MC_WEBHOOK_ALLOW": "LocalHost"}).client()
    start(client, None, "hello", "prompt", webhookUrl=f"http://localhost:{port}/admitted")
    (delivered,) = wait_for(lambda: receiver.got("/admitted"), what="the admitted delivery")
    assert delivered.headers["Host"] == f"localhost:{port}"


def test_an_allow_list_item_that_is_neither_a_name_nor_a_cidr_stops_the_start():
    with pytest.raises(SystemExit, match="'10.0.0.0/33' is neither a host name nor a CIDR"):
        from_env(webhook_allow="localhost, 10.0.0.0/33")


@pytest.fixture
def resolver(monkeypatch):
    """Names of our own: `names[name]` is the list of addresses each lookup answers, one by one."""
    names: dict[str, list[str]] = {}
    asked: list[str] = []
    real = socket.getaddrinfo

    def lookup(host, port, *args, **kwargs):
        if host not in names:
            return real(host, port, *args, **kwargs)
        asked.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (names[host].pop(0), port or 0))]

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    return names, asked


async def test_a_delivery_connects_to_the_address_it_checked(receiver, resolver):
    """DNS rebinding: the name answers loopback (admitted) once, then the metadata address. The
    request goes to the address checked, never to a second answer."""
    names, asked = resolver
    names["rebind.test"] = ["127.0.0.1", "169.254.169.254"]
    url = f"http://rebind.test:{receiver.server_address[1]}/rebind"
    async with outbound.client(5) as client:
        sent = await outbound.send(client, url, outbound.allowed("127.0.0.0/8"), content=b"{}")
        assert sent.status_code == 204
        assert len(receiver.got("/rebind")) == 1 and asked == ["rebind.test"]
        assert receiver.got("/rebind")[0].headers["Host"] == f"rebind.test:{receiver.server_address[1]}"
        with pytest.raises(outbound.Refused, match="169.254.169.254, a link-local or cloud-metadata"):
            await outbound.send(client, url, outbound.allowed("127.0.0.0/8"))
    assert len(receiver.got("/rebind")) == 1


async def test_https_to_a_checked_address_still_verifies_the_certificate_of_the_name(receiver, resolver, tmp_path):
    """The connection goes to the address, the TLS server name and the check stay the host's."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=tls.test",
         "-addext", "subjectAltName=DNS:tls.test", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert, key)
    receiver.socket = server_side.wrap_socket(receiver.socket, server_side=True)
    names, _ = resolver
    port = receiver.server_address[1]
    names.update({"tls.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    allow = outbound.allowed("127.0.0.0/8")
    trusting = httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(cert)), trust_env=False,
                                 limits=httpx.Limits(max_keepalive_connections=0))
    async with trusting:
        assert (await outbound.send(trusting, f"https://tls.test:{port}/tls", allow)).status_code == 204
        with pytest.raises(httpx.ConnectError, match="certificate verify failed"):  # not this name's certificate
            await outbound.send(trusting, f"https://other.test:{port}/tls", allow)
    assert len(receiver.got("/tls")) == 1
