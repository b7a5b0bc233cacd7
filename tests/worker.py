"""Remote workers for tests that run desktops (and for `scripts/bench.py desktops`).

`Worker` is a `mission-control worker` process started by the command a user runs, with its own
environment and workdir, on a worker key issued for its desktop by `token create`; it is a
tests/server.py `Process`, ready once it has registered. The helpers below drive a server the way
the worker tests all need: a shell agent, a task placed on a desktop, waits on a status.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.api_helpers import wait_for
from tests.server import Process, Server, cli

REGISTERED = b'"event":"registered"'


def worker_keys(server: Server, desktops: list[str]) -> dict[str, tuple[str, str]]:
    """A worker key for each desktop, (key id, token), issued as `token create` issues one, in one
    process beside the server (a process per key costs seconds on a busy machine)."""
    from service.cli import _with_log
    from service.http import auth
    from service.settings import from_env

    async def issue(log, models) -> dict[str, tuple[str, str]]:
        return {name: await auth.issue_key(log, models, f"worker-{name}", ["worker"], actor="mission-control:cli",
                                           desktop=name) for name in desktops}

    settings = from_env(data_dir=str(server.data_dir), database_url=server.env.get("MC_DATABASE_URL", ""))
    return asyncio.run(_with_log(settings, issue))


def worker_key(server: Server, desktop: str) -> tuple[str, str]:
    """(key id, token) of a new worker key for `desktop`, from `token create`."""
    lines = cli(server.data_dir, "token", "create", "--user", f"worker-{desktop}", "--scopes", "worker",
                "--desktop", desktop).stdout.strip().splitlines()
    return lines[0].split()[1], lines[-1]  # "key <id> for ...", then the token alone


class Worker(Process):
    """`mission-control worker` for `desktop` of `server`, its runs under `workdir`. The token
    travels in MC_TOKEN (never on a command line other users can read)."""

    def __init__(self, server: Server, desktop: str, workdir: Path, *, agents: str = "echo", capacity: int = 1,
                 env: dict[str, object] | None = None, token: str | None = None):
        super().__init__(workdir.parent, f"worker-{desktop}", env)
        self.server, self.desktop, self.workdir = server, desktop, workdir
        self.agents, self.capacity = agents, capacity
        self.key_id = ""
        if token is None:
            self.key_id, token = worker_key(server, desktop)
        self.env["MC_TOKEN"] = token
        self._from = 0

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "service.cli", "worker", "--server", self.server.base_url,
                "--desktop", self.desktop, "--agents", self.agents, "--capacity", str(self.capacity),
                "--workdir", str(self.workdir)]

    def spawn(self) -> Worker:
        self._from = self.log_path.stat().st_size if self.log_path.exists() else 0  # a restart's own lines
        super().spawn()
        return self

    def start(self, timeout: float = 30) -> Worker:
        super().start(timeout)
        return self

    @property
    def waiting_for(self) -> str:
        return f"registering as desktop {self.desktop}"

    def ready(self) -> bool:
        with open(self.log_path, "rb") as log:
            log.seek(self._from)
            return REGISTERED in log.read()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def send(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def exit_code(self, timeout: float = 30) -> int:
        """How the worker exited, waiting for it at most `timeout` seconds."""
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker {self.desktop} did not exit in {timeout}s: {self.output()[-3000:]}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        """A drain (SIGTERM), or with SIGKILL a crash; a worker drained with runs left is stopped."""
        if self.process is not None and self.process.poll() is None and sig == signal.SIGTERM:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.send_signal(sig)  # the second: stop the runs
        return super().stop(sig, timeout)


def shell_agent(client: httpx.Client, name: str, **config) -> str:
    """A `shell` agent (which only an admin may create); its id."""
    created = client.post("/agents", json={"name": name, "kind": "shell", "config": config})
    assert created.status_code == 201, created.text
    return created.json()["id"]


def echo_agent(client: httpx.Client, name: str) -> str:
    created = client.post("/agents", json={"name": name, "kind": "echo"})
    assert created.status_code == 201, created.text
    return created.json()["id"]


def start_task(client: httpx.Client, agent_id: str, content: str, desktop: str | None = None,
               kind: str = "command") -> str:
    """A task placed on `desktop` (any that hosts the agent's kind when None) and its run started; its id."""
    body: dict = {"type": kind, "content": content}
    if desktop is not None:
        body["desktopId"] = desktop
    created = client.post("/tasks", json=body)
    assert created.status_code == 201, created.text
    task_id = created.json()["id"]
    started = client.post(f"/tasks/{task_id}/run", json={"agentId": agent_id})
    assert started.status_code == 200, started.text
    return task_id


def task(client: httpx.Client, task_id: str) -> dict:
    answer = client.get(f"/tasks/{task_id}")
    assert answer.status_code == 200, answer.text
    return answer.json()


def wait_status(client: httpx.Client, task_id: str, *statuses: str, timeout: float = 30) -> dict:
    """The task once its status is one of `statuses`; fails with the task as it is after `timeout`."""
    try:
        return wait_for(lambda: (found := task(client, task_id))["status"] in statuses and found,
                        timeout, f"task {task_id} to be {' or '.join(statuses)}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; it is {task(client, task_id)}") from None


def desktop(client: httpx.Client, name: str) -> dict | None:
    answer = client.get(f"/desktops/{name}")
    if answer.status_code == 404:
        return None
    assert answer.status_code == 200, answer.text
    return answer.json()


def wait_desktop(client: httpx.Client, name: str, status: str, timeout: float = 30) -> dict:
    return wait_for(lambda: (found := desktop(client, name)) is not None and found["status"] == status and found,
                    timeout, f"desktop {name} to be {status}")


def last_run(client: httpx.Client, task_id: str) -> dict:
    answer = client.get(f"/tasks/{task_id}/runs")
    assert answer.status_code == 200, answer.text
    return answer.json()[-1]


def output(client: httpx.Client, task_id: str) -> str:
    answer = client.get(f"/tasks/{task_id}/output")
    assert answer.status_code == 200, answer.text
    return answer.text


def gone(pid: int) -> bool:
    """Whether no process has `pid` any more (a zombie counts as gone: it runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_file(path: Path, timeout: float = 30) -> str:
    """The file's text once it holds a whole line."""
    return wait_for(lambda: path.exists() and path.read_text().endswith("\n") and path.read_text(), timeout,
                    f"{path} to be written")

