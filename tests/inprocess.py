"""The app in this process, for tests that check requests and answers and need no real server.

`InProcess` runs `create_app(settings)` on an event loop in a thread of its own, through the ASGI
lifespan as uvicorn runs it (the runner, the webhook worker and the projector all start), with a
real SQLite file in `data_dir` and its first admin key issued as `serve` issues it. Its clients
are sync `httpx.Client`s whose requests go to the app through `httpx.ASGITransport`, answers
streamed as the app sends them (the activity stream works): no port, no process start-up. It has
the public surface of `tests.server.Server` (`base_url`, `client`, `http`, `token`,
`admin_token`, `data_dir`, `output`, `stop`), so a fixture switches by one line.

What it cannot do, a real `Server` does: kill -9, signals, uvicorn and the guards `serve` puts
in front of the app, raw sockets, the CLI's `serve`, memory measured per process. Runs of
process agents (shell, exec) stay on real servers too: they make the process a child subreaper.
A second SQLite connection to the app's file from this process must not be opened with
`events.open_log` (see `InProcess.log`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import os
import queue
import sys
import threading
from pathlib import Path
from unittest import mock

import httpx
import pytest

from service.http import auth
from service.app import create_app
from service.cli import first_admin_key
from service.http.logs import configure
from service.settings import from_env
from tests.server import API, starter, storage_env


class _LogSink(io.TextIOBase):
    """Where the structured logs of in-process apps go (the logging configuration is one per
    process): a line written on an app's loop thread to that app's `output()` file, a line from
    any other thread to every running app's."""

    def __init__(self) -> None:
        self.files: dict[int, object] = {}  # loop thread id -> log file
        self.lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self.lock:
            mine = self.files.get(threading.get_ident())
            for file in [mine] if mine else self.files.values():
                file.write(text)
                file.flush()
        return len(text)


_sink = _LogSink()
_configured = False


def _log_to_sink() -> None:
    """The service's own log configuration (JSON lines), written to the sink rather than stderr."""
    global _configured
    if not _configured:
        with mock.patch.object(sys, "stderr", _sink):
            configure()
        _configured = True


class _Bridge(httpx.BaseTransport):
    """A sync transport that hands each request to the app's loop (requests from many threads
    run there at once, as on a server) and streams the answer back as the app sends it, so a
    stream's events arrive while it is open. Closing a response early is the client leaving:
    the app's `receive` then says `http.disconnect`, as a server's does."""

    def __init__(self, harness: InProcess):
        self.harness = harness

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()  # a sync body, read here, is a stream the async transport can read too
        loop = self.harness._loop
        messages: queue.Queue = queue.Queue()
        left = threading.Event()  # set by the client; the app's loop learns of it through `leave`
        leave: list = []

        async def app(scope, receive, send) -> None:
            gone = asyncio.Event()
            leave.append(lambda: loop.call_soon_threadsafe(gone.set))
            body_read = False

            async def receive_then_disconnect() -> dict:
                nonlocal body_read
                if not body_read:
                    message = await receive()
                    body_read = not message.get("more_body", False)
                    return message
                await gone.wait()
                return {"type": "http.disconnect"}

            async def send_to_client(message: dict) -> None:
                if not left.is_set():
                    messages.put(message)
                if message["type"] == "http.response.body":  # the transport need not keep the body
                    message = {**message, "body": b""}
                await send(message)

            await self.harness.asgi(scope, receive_then_disconnect, send_to_client)

        transport = httpx.ASGITransport(app, raise_app_exceptions=False, client=("127.0.0.1", 50000))
        exchange = asyncio.run_coroutine_threadsafe(transport.handle_async_request(request), loop)
        exchange.add_done_callback(lambda _: messages.put(None))
        timeout = (request.extensions.get("timeout") or {}).get("read") or 60
        start = _next(messages, timeout)
        if start is None:  # no answer was started: the transport made one (a 500), or failed
            answer = exchange.result()
            return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)
        body = _Body(messages, timeout, exchange, left, leave)
        return httpx.Response(start["status"], headers=[(k, v) for k, v in start.get("headers", [])], stream=body)


def _next(messages: queue.Queue, timeout: float) -> dict | None:
    try:
        return messages.get(timeout=timeout)
    except queue.Empty:
        raise httpx.ReadTimeout(f"the app sent nothing for {timeout}s") from None


class _Body(httpx.SyncByteStream):
    def __init__(self, messages: queue.Queue, timeout: float, exchange, left: threading.Event, leave: list):
        self.messages, self.timeout, self.exchange, self.left, self.leave = messages, timeout, exchange, left, leave

    def __iter__(self):
        while (message := _next(self.messages, self.timeout)) is not None:
            if message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    return
        self.exchange.result()  # the app ended mid-answer: why

    def close(self) -> None:
        if not self.exchange.done():
            self.left.set()
            for disconnect in self.leave:
                disconnect()
            concurrent.futures.wait([self.exchange], 10)  # the app's end, as it handles the disconnect


class InProcess:
    """`create_app` on `data_dir` in this process; `env` are MC_* settings, as a server's would be."""

    def __init__(self, data_dir: Path, env: dict[str, object] | None = None):
        self.data_dir = data_dir
        self.env = {k: str(v) for k, v in {**storage_env(data_dir), **(env or {})}.items()}
        self.base_url = "http://in-process"
        self.log_path = data_dir.parent / f"{data_dir.name}-in-process.log"
        self.admin_token = ""
        self._clients: list[httpx.Client] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, timeout: float = 30) -> InProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with mock.patch.dict(os.environ, self.env):
            self.settings = from_env(data_dir=str(self.data_dir))
        _log_to_sink()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"app-{self.data_dir.name}", daemon=True)
        self._thread.start()
        with _sink.lock:
            _sink.files[self._thread.ident] = open(self.log_path, "a")
        self._lifespan = None
        try:
            token = self.call(first_admin_key(self.settings), timeout)
            self.admin_token = token or (self.data_dir / "admin-token").read_text().strip()
            self.app = create_app(self.settings)
            self.state: dict = {}
            self._lifespan = self.call(self._start_lifespan(), timeout)
        except BaseException:
            self.stop()  # no loop thread left behind by a start that failed
            raise
        return self

    async def _start_lifespan(self) -> tuple[asyncio.Task, asyncio.Queue]:
        """The ASGI lifespan protocol, as a server speaks it; the task lives until `stop`."""
        inbox: asyncio.Queue = asyncio.Queue()
        started: asyncio.Future = asyncio.get_running_loop().create_future()

        async def send(message: dict) -> None:
            kind = message["type"]
            if kind.endswith(".failed"):
                raise RuntimeError(f"the app's {kind}: {message.get('message')}")
            if kind == "lifespan.startup.complete":
                started.set_result(None)

        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}
        await inbox.put({"type": "lifespan.startup"})
        task = asyncio.create_task(self.app(scope, inbox.get, send))
        done, _ = await asyncio.wait([task, started], return_when=asyncio.FIRST_COMPLETED)
        if started not in done:
            task.result()  # raises why the start-up failed
            raise RuntimeError("the app's lifespan ended before its start-up completed")
        return task, inbox

    async def asgi(self, scope, receive, send) -> None:
        # each request gets a copy of the lifespan's state, as uvicorn gives it
        await self.app({**scope, "state": dict(self.state)}, receive, send)

    def call(self, coroutine, timeout: float = 60):
        """Run `coroutine` on the app's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def client(self, token: str | None = None, **options) -> httpx.Client:
        """An HTTP client for the API; `token=None` means the admin key, `token=""` none at all."""
        token = self.admin_token if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.http(base_url=self.base_url + API, headers=headers, **options)

    def http(self, **options) -> httpx.Client:
        """A client with no key for any path of the app (`/healthz`, `/metrics`, ...)."""
        client = httpx.Client(**{"base_url": self.base_url, "timeout": 30, **options}, transport=_Bridge(self))
        self._clients.append(client)
        return client

    @property
    def log(self):
        """The app's own event log. A second log on the same file in this process would break
        SQLite's locks (POSIX locks are the process's, and closing any descriptor of the file
        drops them): a test appends through this one, on the app's loop (`call`)."""
        return self.state["log"]

    @property
    def models(self):
        return self.state["models"]

    def token(self, user: str, scopes: str, project: str | None = None, desktop: str | None = None) -> str:
        """A key issued on the app's own log, as `mission-control token create` issues one."""

        async def issue() -> str:
            scope_list = [s.strip() for s in scopes.split(",") if s.strip()]
            _, token = await auth.issue_key(self.log, self.models, user, scope_list, project,
                                            actor="mission-control:cli", desktop=desktop)
            return token

        return self.call(issue())

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self._loop is None:
            return
        for client in self._clients:
            client.close()
        self._clients.clear()

        async def shut_down() -> None:
            if self._lifespan is not None:
                task, inbox = self._lifespan
                await inbox.put({"type": "lifespan.shutdown"})
                await task

        try:
            self.call(shut_down())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
            self._loop = None
            with _sink.lock:
                _sink.files.pop(self._thread.ident).close()

    def __enter__(self) -> InProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


@pytest.fixture
def app_server(tmp_path):
    """A fresh app in this process with default settings for one test."""
    with InProcess(tmp_path / "data").start() as started:
        yield started


@pytest.fixture
def make_app_server(tmp_path):
    """Start in-process apps with explicit settings: `make_app_server(MC_MAX_CONCURRENT=5)`."""
    yield from starter(InProcess, tmp_path)


@pytest.fixture(scope="module")
def shared_app_server(tmp_path_factory):
    """One in-process app per test module."""
    with InProcess(tmp_path_factory.mktemp("shared") / "data").start() as started:
        yield started
