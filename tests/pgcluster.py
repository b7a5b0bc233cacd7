"""A PostgreSQL cluster of a test's own, for tests that restart or crash the server itself: the
shared one on 5432 serves tests running in parallel and must never go down.

`initdb`, `pg_ctl` and `postgres` refuse to run as root: as root they run as the `postgres` user
(`runuser`), otherwise as whoever runs the tests. The data dir lives in a directory of its own
under the system's tmp (a test's tmp_path lies below directories only root may enter), its unix
socket in it, TCP on a free loopback port, and fsync on: durability across a crash is what the
tests that use it check.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server import free_port


def _bin_dir() -> Path | None:
    """Where initdb and pg_ctl are: on PATH, or in the newest /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


def _unavailable() -> str | None:
    if _bin_dir() is None:
        return "initdb is not installed (PostgreSQL's server binaries), so no private cluster can be made"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a `postgres` user, which PostgreSQL's server would run as"
        if shutil.which("runuser") is None:
            return "running as root without `runuser`, to start PostgreSQL's server as the postgres user"
    return None


class Cluster:
    """`start`, `stop`, `restart`, `url(database)`; `psql`-free admin by psycopg on `url("postgres")`."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.bin = _bin_dir()

    def _run(self, program: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        argv = [str(self.bin / program), *args]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(f"{program} {' '.join(args)} failed ({done.returncode}): {done.stdout}{done.stderr}"
                               + self.server_log()[-3000:])
        return done

    def init(self) -> Cluster:
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"port = {self.port}\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.data}'\n"
                "fsync = on\n"
                "synchronous_commit = on\n"
                "max_connections = 60\n"
                "shared_buffers = 16MB\n"
            )
        return self

    def start(self) -> Cluster:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.data / "server.log"), "-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        """`immediate` is a crash: no checkpoint, recovery from the WAL at the next start."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def server_log(self) -> str:
        path = self.data / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def private_postgres() -> Iterator[Cluster]:
    """A running cluster of this test's own, removed afterwards. Skipped (with why) when none can
    be made, failed instead when MC_REQUIRE_POSTGRES=1."""
    reason = _unavailable()
    if reason is not None:
        if os.environ.get("MC_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{reason}, and MC_REQUIRE_POSTGRES=1 requires it")
        pytest.skip(f"{reason}: the tests that restart PostgreSQL are skipped")
    root = Path(tempfile.mkdtemp(prefix="mc-pg-"))
    cluster = Cluster(root)
    try:
        cluster.init().start()
        yield cluster
    finally:
        if cluster.running():
            try:
                cluster.stop("immediate")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass  # removed below all the same
        shutil.rmtree(root, ignore_errors=True)
