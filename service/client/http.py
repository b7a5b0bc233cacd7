"""A typed client of Mission Control's HTTP API, sync (`Client`) and async (`AsyncClient`).

Its models are the server's own msgspec types (the same that encode the answers), so what the
client decodes is what the server meant. Each operation is declared once, in `_Operations`, as a
`Call`; the two clients differ only in how they send it. Both retry an answer 429 (the
concurrency limit, a full desktop, the key's rate limit: nothing was done) after the
`Retry-After` it names, for at most `patience` seconds, and `stream()` follows the activity stream
across dropped connections and server restarts, resuming by `Last-Event-ID`: no event lost, none
twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any, Generic, TypeVar

import httpx
import msgspec

from events import RecordedEvent
from projections.agents import Agent
from projections.runs import Run
from projections.tasks import Task
from service.api import API_PREFIX
from service.api.schemas import Accepted, ApprovalOut, DesktopOut, Overview
from service.http.errors import Error

T = TypeVar("T")

DEFAULT_SERVER = "http://127.0.0.1:8000"
DEFAULT_PATIENCE = 60.0
"""Seconds an operation may spend waiting out 429 answers before it gives up with the last one."""
STREAM_READ_SECONDS = 45.0
"""A stream silent this long (three of the server's heartbeats at most) is taken as dropped."""
BACKOFF_FIRST, BACKOFF_MAX = 0.25, 5.0


class ApiError(Exception):
    """The server refused, or could not be asked: `str()` is the sentence to show."""

    def __init__(self, detail: str, status: int = 0, code: str = "", retry_after: float | None = None):
        super().__init__(detail)
        self.detail, self.status, self.code, self.retry_after = detail, status, code, retry_after


class Unreachable(ApiError):
    """No answer from the server: it is down, or the address is wrong."""


@dataclass
class Call(Generic[T]):
    """One request and the type its answer decodes to (`str`: the body as text; None: nothing)."""

    method: str
    path: str
    answer: type[T] | None
    params: dict[str, Any] = field(default_factory=dict)
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Tasks:
    """A page of `GET /tasks`, and how many tasks match in all (`X-Total-Count`)."""

    items: list[Task]
    total: int


def _decode(call: Call[T], answer: httpx.Response) -> T:
    if call.answer is None:
        return None  # type: ignore[return-value]
    if call.answer is str:
        return answer.text  # type: ignore[return-value]
    if call.answer is Tasks:
        items = msgspec.json.decode(answer.content, type=list[Task])
        return Tasks(items, int(answer.headers.get("x-total-count", len(items))))  # type: ignore[return-value]
    return msgspec.json.decode(answer.content, type=call.answer)


def _retry_after(answer: httpx.Response) -> float | None:
    """Seconds from `Retry-After`: a number of seconds or an HTTP date."""
    raw = answer.headers.get("retry-after")
    if raw is None:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(raw))
    with contextlib.suppress(TypeError, ValueError):
        return max(0.0, email.utils.parsedate_to_datetime(raw).timestamp() - time.time())
    return None


def refusal(answer: httpx.Response) -> ApiError:
    """The server's error answer as an ApiError carrying its sentence."""
    try:
        error = msgspec.json.decode(answer.content, type=Error)
        detail, code = error.detail, error.code
    except msgspec.DecodeError:
        detail, code = f"The server answered HTTP {answer.status_code}: {answer.text[:200].strip()}", ""
    return ApiError(detail, answer.status_code, code, _retry_after(answer))


def _unreachable(server: str, exc: httpx.TransportError) -> Unreachable:
    why = str(exc) or type(exc).__name__
    return Unreachable(f"Cannot reach the server at {server} ({why}); is `mission-control serve` running there? "
                       "(--server URL or MC_SERVER)")


def _backoff(attempt: int) -> float:
    delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2**attempt)
    return random.uniform(delay / 2, delay)


def _uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


class _Operations:
    """Every operation of the API a person drives, as a `Call` handed to `_send`: on `Client` it
    returns the decoded answer, on `AsyncClient` an awaitable of it."""

    def _send(self, call: Call[T]) -> T:
        raise NotImplementedError

    # Tasks

    def create_task(self, type: str, content: str, *, idempotency_key: str | None = None, **fields: Any) -> Task:
        """`fields`: any of the API's (`title`, `description`, `desktopId`, `agentId`, `projectId`,
        `requiresApproval`, `priority`, `timeoutSeconds`, `metadata`, `dependsOn`, `webhookUrl`)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._send(Call("POST", "/tasks", Task, body={"type": type, "content": content, **fields},
                               headers=headers))

    def list_tasks(self, **filters: Any) -> Tasks:
        """`filters`: the API's (`status`, `desktopId`, `agentId`, `projectId`, `search`, `archived`,
        `sort`, `limit`, `offset`); None values are left out."""
        return self._send(Call("GET", "/tasks", Tasks, params=filters))

    def task(self, task_id: str) -> Task:
        return self._send(Call("GET", f"/tasks/{task_id}", Task))

    def run_task(self, task_id: str, *, agent_id: str | None = None, queue: bool | None = None,
                 queue_timeout_seconds: int | None = None) -> Task:
        """Answers the task running, or `queued` (with its `queuePosition`) when `queue` let it wait."""
        body = {k: v for k, v in (("agentId", agent_id), ("queue", queue), ("queueTimeoutSeconds", queue_timeout_seconds))
                if v is not None}
        return self._send(Call("POST", f"/tasks/{task_id}/run", Task, body=body))

    def cancel_task(self, task_id: str, reason: str | None = None) -> Task:
        return self._send(Call("POST", f"/tasks/{task_id}/cancel", Task, body={"reason": reason} if reason else {}))

    def retry_task(self, task_id: str) -> Task:
        return self._send(Call("POST", f"/tasks/{task_id}/retry", Task, body={}))

    def send_message(self, task_id: str, message: str) -> Accepted:
        return self._send(Call("POST", f"/tasks/{task_id}/messages", Accepted, body={"message": message}))

    def review_task(self, task_id: str, decision: str, feedback: str | None = None) -> Task:
        return self._send(Call("POST", f"/tasks/{task_id}/review", Task,
                               body={"decision": decision, "feedback": feedback}))

    def output(self, task_id: str, run_id: str | None = None) -> str:
        return self._send(Call("GET", f"/tasks/{task_id}/output", str, params={"runId": run_id}))

    def runs(self, task_id: str) -> list[Run]:
        return self._send(Call("GET", f"/tasks/{task_id}/runs", list[Run]))

    # Approvals, agents, desktops, the overview

    def approvals(self, status: str = "pending") -> list[ApprovalOut]:
        return self._send(Call("GET", "/approvals", list[ApprovalOut], params={"status": status}))

    def resolve_approval(self, approval_id: str, decision: str, feedback: str | None = None) -> ApprovalOut:
        return self._send(Call("POST", f"/approvals/{approval_id}/resolve", ApprovalOut,
                               body={"decision": decision, "feedback": feedback}))

    def agents(self) -> list[Agent]:
        return self._send(Call("GET", "/agents", list[Agent]))

    def create_agent(self, name: str, kind: str, config: dict[str, Any] | None = None) -> Agent:
        return self._send(Call("POST", "/agents", Agent, body={"name": name, "kind": kind, "config": config or {}}))

    def pause_agent(self, agent_id: str) -> Agent:
        return self._send(Call("POST", f"/agents/{agent_id}/pause", Agent, body={}))

    def resume_agent(self, agent_id: str) -> Agent:
        return self._send(Call("POST", f"/agents/{agent_id}/resume", Agent, body={}))

    def desktops(self) -> list[DesktopOut]:
        return self._send(Call("GET", "/desktops", list[DesktopOut]))

    def drain_desktop(self, desktop_id: str) -> DesktopOut:
        return self._send(Call("POST", f"/desktops/{desktop_id}/drain", DesktopOut, body={}))

    def resume_desktop(self, desktop_id: str) -> DesktopOut:
        return self._send(Call("POST", f"/desktops/{desktop_id}/resume", DesktopOut, body={}))

    def overview(self) -> Overview:
        return self._send(Call("GET", "/overview", Overview))


class _Base:
    def __init__(self, server: str = DEFAULT_SERVER, token: str = "", *, patience: float = DEFAULT_PATIENCE,
                 on_retry: Callable[[ApiError, float], None] | None = None, timeout: float = 30.0):
        """`server`: the service's root URL (an `/api/mission-control` suffix is allowed). `on_retry(error,
        seconds)` is told of each 429 waited out, and of each reconnection of a stream."""
        self.server = server.rstrip("/").removesuffix(API_PREFIX)
        self.patience, self.on_retry = patience, on_retry
        self._options = dict(
            base_url=self.server + API_PREFIX, timeout=httpx.Timeout(timeout, connect=5),
            headers={"User-Agent": f"mission-control/{version('mission-control')}",
                     **({"Authorization": f"Bearer {token}"} if token else {})},
        )

    def _request(self, call: Call) -> httpx.Request:
        params = _present(call.params)
        content = None if call.body is None else msgspec.json.encode(call.body)
        headers = {**call.headers, **({"Content-Type": "application/json"} if content is not None else {})}
        return self._http.build_request(call.method, call.path, params=params, content=content, headers=headers)

    def _wait(self, answer: httpx.Response, started: float) -> float | None:
        """How long to wait before sending a call again that was answered `answer`; None: not again."""
        if answer.status_code != 429:
            return None
        error = refusal(answer)
        wait = error.retry_after if error.retry_after is not None else 1.0
        if time.monotonic() + wait - started > self.patience:
            return None
        if self.on_retry:
            self.on_retry(error, wait)
        return wait

    def _stream_call(self, after: int, types: str | None, task_id: str | None, stream: str | None) -> Call:
        return Call("GET", "/activity/stream", None, params={"types": types, "taskId": task_id, "stream": stream},
                    headers={"Accept": "text/event-stream", "Last-Event-ID": str(after)})

    def _stream_timeout(self, idle: float | None) -> httpx.Timeout:
        read = STREAM_READ_SECONDS if idle is None else min(STREAM_READ_SECONDS, idle)
        return httpx.Timeout(read, connect=5)


class Client(_Base, _Operations):
    """The sync client: `with Client(server, token) as mc: mc.task(task_id)`."""

    def __init__(self, *args: Any, **options: Any):
        super().__init__(*args, **options)
        self._http = httpx.Client(**self._options)

    def _send(self, call: Call[T]) -> T:
        started = time.monotonic()
        while True:
            try:
                answer = self._http.send(self._request(call))
            except httpx.TransportError as exc:
                raise _unreachable(self.server, exc) from None
            if answer.is_success:
                return _decode(call, answer)
            wait = self._wait(answer, started)
            if wait is None:
                raise refusal(answer)
            time.sleep(wait)

    def agent_id(self, name_or_id: str) -> str:
        """An agent's id from its id or its name."""
        return _agent_named(name_or_id, self.agents)

    def stream(self, after: int = 0, *, types: str | None = None, task_id: str | None = None,
               stream: str | None = None, idle: float | None = None) -> Iterator[RecordedEvent]:
        """The activity stream after position `after`, live, as recorded events. It reconnects
        whenever the connection drops (resuming by Last-Event-ID, so exactly), waiting out a 429 or
        a restarting server. `idle`: end once that many seconds pass without an event since the last
        one or the last (re)connection. Raises ApiError for a refusal, and Unreachable when the
        first connection fails."""
        follow = _Follow(after, idle)
        while not follow.over():
            call = self._stream_call(follow.after, types, task_id, stream)
            try:
                with self._http.stream(call.method, call.path, params=_present(call.params), headers=call.headers,
                                       timeout=self._stream_timeout(idle)) as answer:
                    if not answer.is_success:
                        answer.read()
                        follow.refused(answer, self.on_retry)
                        time.sleep(follow.wait)
                        continue
                    follow.connected()
                    for line in answer.iter_lines():
                        if (event := follow.line(line)) is not None:
                            yield event
                        if follow.over():
                            return
                follow.dropped(None, self)
            except httpx.TransportError as exc:
                follow.dropped(exc, self)
                if not follow.over():
                    time.sleep(follow.wait)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class AsyncClient(_Base, _Operations):
    """The async client: `async with AsyncClient(server, token) as mc: await mc.task(task_id)`."""

    def __init__(self, *args: Any, **options: Any):
        super().__init__(*args, **options)
        self._http = httpx.AsyncClient(**self._options)

    async def _send(self, call: Call[T]) -> T:  # type: ignore[override]
        started = time.monotonic()
        while True:
            try:
                answer = await self._http.send(self._request(call))
            except httpx.TransportError as exc:
                raise _unreachable(self.server, exc) from None
            if answer.is_success:
                return _decode(call, answer)
            wait = self._wait(answer, started)
            if wait is None:
                raise refusal(answer)
            await asyncio.sleep(wait)

    async def agent_id(self, name_or_id: str) -> str:
        agents = await self.agents()
        return _agent_named(name_or_id, lambda: agents)

    async def stream(self, after: int = 0, *, types: str | None = None, task_id: str | None = None,
                     stream: str | None = None, idle: float | None = None) -> AsyncIterator[RecordedEvent]:
        """As `Client.stream`."""
        follow = _Follow(after, idle)
        while not follow.over():
            call = self._stream_call(follow.after, types, task_id, stream)
            try:
                async with self._http.stream(call.method, call.path, params=_present(call.params),
                                             headers=call.headers, timeout=self._stream_timeout(idle)) as answer:
                    if not answer.is_success:
                        await answer.aread()
                        follow.refused(answer, self.on_retry)
                        await asyncio.sleep(follow.wait)
                        continue
                    follow.connected()
                    async for line in answer.aiter_lines():
                        if (event := follow.line(line)) is not None:
                            yield event
                        if follow.over():
                            return
                follow.dropped(None, self)
            except httpx.TransportError as exc:
                follow.dropped(exc, self)
                if not follow.over():
                    await asyncio.sleep(follow.wait)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()


def _present(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


def _agent_named(name_or_id: str, agents: Callable[[], list[Agent]]) -> str:
    if _uuid(name_or_id):
        return name_or_id
    named = [a.id for a in agents() if a.name == name_or_id]
    if len(named) != 1:
        raise ApiError(f"No agent is named {name_or_id!r}." if not named else
                       f"Several agents are named {name_or_id!r} ({', '.join(named)}); give its id.", 404, "not_found")
    return named[0]


_event_decoder = msgspec.json.Decoder(RecordedEvent)


class _Follow:
    """One `stream()`'s state across its connections: the SSE lines read so far, the position
    to resume after, the idle deadline, and the wait before the next connection."""

    def __init__(self, after: int, idle: float | None):
        self.after, self.idle = after, idle
        self.data: list[str] = []
        self.ever_connected = False
        self.attempt = 0
        self.wait = 0.0
        self.quiet_since = time.monotonic()

    def over(self) -> bool:
        return self.idle is not None and time.monotonic() - self.quiet_since >= self.idle

    def connected(self) -> None:
        self.ever_connected, self.attempt, self.data = True, 0, []
        self.quiet_since = time.monotonic()

    def line(self, line: str) -> RecordedEvent | None:
        """Feeds one line of the SSE body; returns the event a blank line completes."""
        if line.startswith("data:"):
            self.data.append(line[5:].removeprefix(" "))
        elif not line and self.data:
            event = _event_decoder.decode("\n".join(self.data))
            self.data = []
            self.after = event.position
            self.quiet_since = time.monotonic()
            return event
        return None  # `id:` repeats the position; comments are heartbeats

    def refused(self, answer: httpx.Response, on_retry: Callable[[ApiError, float], None] | None) -> None:
        """A connection answered with an error: 429 and 503 (a restart) are waited out, the rest raised."""
        error = refusal(answer)
        if answer.status_code not in (429, 503):
            raise error
        self.wait = error.retry_after if error.retry_after is not None else _backoff(self.attempt)
        self.attempt += 1
        if on_retry:
            on_retry(error, self.wait)

    def dropped(self, exc: httpx.TransportError | None, client: _Base) -> None:
        """The connection ended or failed. A first connection that fails is Unreachable; after
        one has worked, the stream reconnects (a restart, a dropped network) with a backoff."""
        if isinstance(exc, httpx.ReadTimeout) and self.over():
            return
        if not self.ever_connected and exc is not None:
            raise _unreachable(client.server, exc)
        self.wait = 0.0 if exc is None else _backoff(self.attempt)
        if exc is not None:
            self.attempt += 1
            if client.on_retry and self.attempt in (1, 10, 100):
                client.on_retry(_unreachable(client.server, exc), self.wait)
        self.data = []
