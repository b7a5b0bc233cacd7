"""Real servers on loopback, for tests that talk HTTP and for `scripts/bench.py`.

`Server` is a `mission-control serve` process started by the same command a user runs, with a
real SQLite file, so a test can also SIGKILL one and start another on the same data dir.
`Uvicorn` is any other ASGI app under uvicorn (the benchmarks' bare floors). Both are a
`Process`: a free port on 127.0.0.1, started and waited for until it answers. `Nodes` are
several `serve` processes on one log (a SQLite data dir shared, or a PostgreSQL database).

`server` gives each test a fresh one; `shared_server` one per test module.

With MC_TEST_BACKEND=postgres every server (and `cli`) keeps its log in a PostgreSQL database of
its own instead, named after its data dir: the API suite's run on PostgreSQL (scripts/test).
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

API = "/api/mission-control"
ROOT = Path(__file__).resolve().parent.parent
BACKEND = os.environ.get("MC_TEST_BACKEND", "sqlite")
_databases: set[str] = set()
"""The PostgreSQL databases this process made for servers' data dirs, dropped at the end."""


def storage_env(data_dir: Path) -> dict[str, str]:
    """The settings that put a server's log on the suite's backend: none for SQLite (the file in
    its data dir); for PostgreSQL, the URL of the data dir's own database, made on first use."""
    if BACKEND == "sqlite":
        return {}
    from tests.conftest import POSTGRES_SERVER, _postgres_admin, require_postgres

    require_postgres()
    name = "mc_api_" + hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:24]
    if name not in _databases:
        with _postgres_admin() as admin:
            if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                admin.execute(f'CREATE DATABASE "{name}"')
        _databases.add(name)
    return {"MC_DATABASE_URL": f"{POSTGRES_SERVER}/{name}"}


@pytest.fixture(scope="session", autouse=True)
def _drop_server_databases():
    yield
    if _databases:
        from tests.conftest import _postgres_drop, POSTGRES_SERVER

        for name in _databases:
            _postgres_drop(f"{POSTGRES_SERVER}/{name}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(data_dir: Path, *args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run `mission-control ARGS --data-dir DATA_DIR` as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args, "--data-dir", str(data_dir)],
        capture_output=True, text=True, env={**os.environ, **storage_env(data_dir), **(env or {})}, check=check,
        timeout=60,
    )


class Process:
    """A server in a process of its own on a free loopback port, its output in
    `log_dir/NAME-PORT.log`. `start` waits until it is `ready`: by default, until `ready_path`
    answers below 500."""

    ready_path = "/healthz"

    def __init__(self, log_dir: Path, name: str, env: dict[str, object] | None = None):
        self.log_dir, self.name = log_dir, name
        self.env = {k: str(v) for k, v in (env or {}).items()}
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}-{self.port}.log"

    def start(self, timeout: float = 30) -> Process:
        return self.spawn().wait_ready(timeout)

    def spawn(self) -> Process:
        """Start the process without waiting for it (`wait_ready`): many start at once that way."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.log_path, "ab")
        self.output_from = self.log_file.tell()  # the log may hold an earlier process's output
        self.process = subprocess.Popen(
            self.argv(), env={**os.environ, **self.env}, stdout=self.log_file, stderr=subprocess.STDOUT, cwd=ROOT,
        )
        return self

    def wait_ready(self, timeout: float = 30) -> Process:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {self.output()[-3000:]}")
            if self.ready():
                return self
            time.sleep(0.05)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"{self.name} was not ready ({self.waiting_for}) in {timeout}s: {self.output()[-3000:]}")

    @property
    def waiting_for(self) -> str:
        return f"answering {self.ready_path}"

    def ready(self) -> bool:
        try:
            return httpx.get(self.base_url + self.ready_path, timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def own_output(self) -> str:
        """What this process has written (not an earlier one on the same port)."""
        with open(self.log_path, "rb") as written:
            written.seek(self.output_from)
            return written.read().decode(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()
        return self.process.returncode

    def __enter__(self) -> Process:  # `with Server(...).start() as server:` stops it at the end
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


class Uvicorn(Process):
    """`uvicorn MODULE:app`, the module found in `app_dir`, run as `mission-control serve` runs
    its app (uvloop and httptools when installed), without the access log."""

    def __init__(self, app: str, app_dir: Path, log_dir: Path, ready_path: str, *options: str):
        super().__init__(log_dir, app.partition(":")[0].rpartition(".")[2])
        self.app, self.app_dir, self.ready_path, self.options = app, app_dir, ready_path, options

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "uvicorn", self.app, "--app-dir", str(self.app_dir), "--host", "127.0.0.1",
                "--port", str(self.port), "--log-level", "warning", "--no-access-log", *self.options]


class Server(Process):
    """`mission-control serve` on `data_dir`; `admin_token` is the key its first start issued."""

    def __init__(self, data_dir: Path, env: dict[str, object] | None = None):
        super().__init__(data_dir, "server", {**storage_env(data_dir), **(env or {})})
        self.data_dir = data_dir
        self.admin_token = ""
        self._clients: list[httpx.Client] = []

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--data-dir", str(self.data_dir)]

    @property
    def waiting_for(self) -> str:
        return "its line saying it listens"

    def ready(self) -> bool:
        # Printed once every process serves (`--processes N`), where /healthz answers once one does.
        return "Mission Control is listening on" in self.own_output()

    def start(self, timeout: float = 30) -> Server:
        super().start(timeout)
        self.admin_token = (self.data_dir / "admin-token").read_text().strip()
        return self

    def client(self, token: str | None = None, **options) -> httpx.Client:
        """An HTTP client for the API; `token=None` means the admin key, `token=""` none at all."""
        token = self.admin_token if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.http(base_url=self.base_url + API, headers=headers, **options)

    def http(self, **options) -> httpx.Client:
        """A client with no key for any path of the server (`/healthz`, `/metrics`, ...)."""
        client = httpx.Client(**{"base_url": self.base_url, "timeout": 30, **options})
        self._clients.append(client)
        return client

    def token(self, user: str, scopes: str, project: str | None = None, desktop: str | None = None) -> str:
        args = ["token", "create", "--user", user, "--scopes", scopes]
        if project:
            args += ["--project", project]
        if desktop:
            args += ["--desktop", desktop]
        return cli(self.data_dir, *args).stdout.strip().splitlines()[-1]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        for client in self._clients:
            client.close()
        self._clients.clear()
        return super().stop(sig, timeout)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> Server:
        """Another process on the same data dir and port."""
        self.stop()
        return self.start()


class Nodes:
    """Nodes on one log: `env` points every node at it, `data_dir(n)` is node n's data dir."""

    def __init__(self, tmp_path: Path, database_url: str | None, env: dict[str, object] | None = None):
        self.tmp_path, self.database_url = tmp_path, database_url
        self.env = {**(env or {}), **({"MC_DATABASE_URL": database_url} if database_url else {})}
        self.started: list[Server] = []

    def data_dir(self, n: int) -> Path:
        return self.tmp_path / (f"data-{n}" if self.database_url else "data")

    def spawn(self, n: int, *options: str, **env) -> Server:
        """Node n started without waiting for it (`serve OPTIONS`); each has a desktop of its own name."""
        node = Server(self.data_dir(n), {**self.env, "MC_LOCAL_DESKTOP": f"node-{n}", **env})
        node.argv = lambda: [*Server.argv(node), *options]
        self.started.append(node.spawn())
        return node

    def start(self, n: int, *options: str, **env) -> Server:
        node = self.spawn(n, *options, **env).wait_ready()
        node.admin_token = self.admin_token()
        return node

    def admin_token(self) -> str:
        tokens = [p.read_text().strip() for p in self.tmp_path.glob("data*/admin-token")]
        assert len(tokens) == 1, f"{len(tokens)} admin-token files"
        return tokens[0]

    def serve(self, n: int, *options: str, **env) -> subprocess.CompletedProcess:
        """`serve` in the foreground: for a node that must refuse to start."""
        return cli(self.data_dir(n), "serve", "--port", str(free_port()), *options,
                   env={**self.env, "MC_LOCAL_DESKTOP": f"node-{n}", **env}, check=False)

    def worker_token(self, n: int, desktop: str) -> str:
        """A worker key for `desktop`, made by `token create` on node n's log."""
        made = cli(self.data_dir(n), "token", "create", "--user", f"worker-{desktop}", "--scopes", "worker",
                   "--desktop", desktop, env=self.env)
        return made.stdout.strip().splitlines()[-1]

    def __enter__(self) -> Nodes:  # `with Nodes(...) as nodes:` stops every node it started at the end
        return self

    def __exit__(self, *exc_info) -> None:
        for node in self.started:
            node.stop()


@pytest.fixture
def server(tmp_path):
    """A fresh server with default settings for one test (`make_server` for other settings)."""
    yield from _serve(tmp_path / "data", {})


@pytest.fixture
def make_server(tmp_path):
    """Start servers with explicit settings: `make_server(MC_MAX_CONCURRENT=5)`."""
    yield from starter(Server, tmp_path)


def starter(kind, tmp_path: Path):
    """Yields `make(data_dir=None, **env)`, which starts a `kind` (a `Server`, or an
    `InProcess`) on a fresh data dir by default; all it started are stopped at the end."""
    started = []

    def make(data_dir: Path | None = None, **env):
        s = kind(data_dir or tmp_path / f"data-{len(started)}", env).start()
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    yield from _serve(tmp_path_factory.mktemp("shared") / "data", {})


def _serve(data_dir: Path, env: dict[str, str]):
    s = Server(data_dir, env).start()
    try:
        yield s
    finally:
        s.stop()
