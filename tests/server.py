"""A real `mission-control serve` process on loopback, for tests that talk HTTP.

`server` gives each test a fresh one; `shared_server` one per test module. Both are real
uvicorn processes on 127.0.0.1 with a real SQLite file, started by the same command a user
runs, so a test can also SIGKILL one and start another on the same data dir.
"""

from __future__ import annotations

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(data_dir: Path, *args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run `mission-control ARGS --data-dir DATA_DIR` as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args, "--data-dir", str(data_dir)],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, check=check, timeout=60,
    )


class Server:
    def __init__(self, data_dir: Path, env: dict[str, str] | None = None):
        self.data_dir = data_dir
        self.env = {k: str(v) for k, v in (env or {}).items()}
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.admin_token = ""
        self._clients: list[httpx.Client] = []

    def start(self, timeout: float = 30) -> Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.data_dir / f"server-{self.port}.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--data-dir", str(self.data_dir)],
            env={**os.environ, **self.env}, stdout=self.log_file, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.output()[-3000:]}")
            try:
                if httpx.get(self.base_url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        else:
            raise RuntimeError(f"server did not answer /healthz in {timeout}s: {self.output()[-3000:]}")
        self.admin_token = (self.data_dir / "admin-token").read_text().strip()
        return self

    def output(self) -> str:
        return (self.data_dir / f"server-{self.port}.log").read_text(errors="replace")

    def client(self, token: str | None = None, **options) -> httpx.Client:
        """An HTTP client for the API; `token=None` means the admin key, `token=""` none at all."""
        token = self.admin_token if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = httpx.Client(base_url=self.base_url + API, headers=headers, timeout=30, **options)
        self._clients.append(client)
        return client

    def token(self, user: str, scopes: str, project: str | None = None) -> str:
        args = ["token", "create", "--user", user, "--scopes", scopes]
        if project:
            args += ["--project", project]
        return cli(self.data_dir, *args).stdout.strip().splitlines()[-1]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        for client in self._clients:
            client.close()
        self._clients.clear()
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

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> Server:
        """Another process on the same data dir and port."""
        self.stop()
        return self.start()


@pytest.fixture
def server(tmp_path):
    """A fresh server with default settings for one test (`make_server` for other settings)."""
    yield from _serve(tmp_path / "data", {})


@pytest.fixture
def make_server(tmp_path):
    """Start servers with explicit settings: `make_server(MC_MAX_CONCURRENT=5)`."""
    started: list[Server] = []

    def make(data_dir: Path | None = None, **env) -> Server:
        s = Server(data_dir or tmp_path / f"data-{len(started)}", env).start()
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
