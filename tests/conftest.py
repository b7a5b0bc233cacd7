"""Shared fixtures."""

from __future__ import annotations

import functools
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from events import EventLog

# Fixtures for tests that talk HTTP: to a real server, `server`, `make_server`, `shared_server`
# (tests/server.py); to the app in this process, `app_server`, `make_app_server`,
# `shared_app_server` (tests/inprocess.py); and `api_server` (tests/api_helpers.py). `private_postgres`
# is a PostgreSQL cluster of a test's own, to restart and crash (tests/pgcluster.py).
pytest_plugins = ["tests.server", "tests.inprocess", "tests.api_helpers", "tests.pgcluster"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test has a node id of its own. pytest-xdist hands tests to its workers by node id and
    runs one test of those that share one, silently; pytest 9 ids schemathesis's tests (one an
    operation, tests/test_openapi.py) by their function alone, so each gets its operation back as
    its parameter, as under pytest 8. Any other repeat stops the run."""
    for item in items:
        name, base = item.name, getattr(item, "originalname", item.name)
        if item.nodeid.endswith("::" + base) and name.startswith(base + "[") and name.endswith("]"):
            item._id = item.parent.id.child(base).with_params(name[len(base) + 1:-1])
    repeated = [nodeid for nodeid, count in Counter(item.nodeid for item in items).items() if count > 1]
    if repeated:
        raise pytest.UsageError(f"tests that share a node id (only one of each would run in parallel): {repeated}")
    if os.environ.get("MC_TEST_BACKEND") == "postgres":
        _keep_the_api_suite(items)


def _keep_the_api_suite(items: list[pytest.Item]) -> None:
    """MC_TEST_BACKEND=postgres runs the suite again with every server on PostgreSQL
    (tests/server.py), but for the tests that run on both backends by themselves (`nodes`,
    `log_factory`, `postgres_database`) and those of the SQLite file itself (`sqlite_file`)."""
    def api(item: pytest.Item) -> bool:
        names = set(getattr(item, "fixturenames", ()))
        return not names & {"nodes", "log_factory", "postgres_database"} and item.get_closest_marker("sqlite_file") is None

    items[:] = [item for item in items if api(item)]

# --- event logs ----------------------------------------------------------------
#
# `log_factory` runs a test once per backend. A backend is three functions: one that names
# fresh, empty storage for a test, one that opens a log on it, and one that removes the storage
# once the test's logs are closed. The log's contract suite and the read models' (read_models(log)
# picks the backend's) run on each backend in LOG_BACKENDS.


def _sqlite_storage(tmp_path: Path, n: int) -> str:
    return str(tmp_path / f"log-{n}.db")


async def _sqlite_open(storage: str, **options) -> EventLog:
    from events.sqlite import SqliteLog

    log = SqliteLog(storage, **options)
    await log.open()
    return log


# PostgreSQL as the project's machines run it (issue 15): trust authentication, user postgres, and
# a database `test` to connect to. Each storage is a database of its own, named uniquely, so tests
# running in parallel (pytest-xdist) never meet.
POSTGRES_SERVER = "postgresql://postgres@127.0.0.1:5432"


def _postgres_admin():
    import psycopg

    return psycopg.connect(f"{POSTGRES_SERVER}/test", autocommit=True, connect_timeout=5)


@functools.cache
def postgres_unreachable() -> str | None:
    """Why PostgreSQL cannot be used, or None when it can."""
    try:
        _postgres_admin().close()
    except Exception as exc:  # noqa: BLE001 - any reason at all is reported, in the sentence
        why = " ".join(str(exc).split()) or type(exc).__name__
        return f"PostgreSQL is not reachable at {POSTGRES_SERVER}/test ({why})"
    return None


def require_postgres() -> None:
    """Skip the test when PostgreSQL is unreachable, or fail it when MC_REQUIRE_POSTGRES=1 (CI)."""
    reason = postgres_unreachable()
    if reason is None:
        return
    if os.environ.get("MC_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{reason}, and MC_REQUIRE_POSTGRES=1 requires it")
    pytest.skip(f"{reason}: the PostgreSQL tests are skipped")


def _postgres_storage(tmp_path: Path, n: int) -> str:
    name = f"mc_test_{uuid.uuid4().hex}"
    with _postgres_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return f"{POSTGRES_SERVER}/{name}"


async def _postgres_open(storage: str, **options) -> EventLog:
    from events.postgres import PostgresLog

    log = PostgresLog(storage, **options)
    await log.open()
    return log


def _postgres_drop(storage: str) -> None:
    with _postgres_admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{storage.rpartition("/")[2]}" WITH (FORCE)')


@pytest.fixture
def postgres_database(tmp_path) -> Iterator[str]:
    """The URL of a fresh, empty PostgreSQL database, dropped after the test."""
    require_postgres()
    url = _postgres_storage(tmp_path, 0)
    try:
        yield url
    finally:
        _postgres_drop(url)


LOG_BACKENDS: dict[str, tuple[Callable[[Path, int], str], Callable[..., Awaitable[EventLog]], Callable[[str], None]]] = {
    "sqlite": (_sqlite_storage, _sqlite_open, lambda storage: None),  # tmp_path goes by itself
    "postgres": (_postgres_storage, _postgres_open, _postgres_drop),
}


class LogFactory:
    """`await make(**options)` opens a log on fresh storage; every log it opened is closed at teardown."""

    def __init__(self, backend: str, tmp_path: Path):
        self.backend = backend
        self._storage, self._open, self._drop = LOG_BACKENDS[backend]
        self._tmp_path = tmp_path
        self._logs: list[tuple[EventLog, str]] = []
        self._made: list[str] = []

    async def __call__(self, **options) -> EventLog:
        storage = self._storage(self._tmp_path, len(self._made))
        self._made.append(storage)
        return await self._opened(storage, options)

    async def reopen(self, log: EventLog, **options) -> EventLog:
        """Another log on the same storage as `log` (which may be closed or still open)."""
        storage = next(s for made, s in self._logs if made is log)
        return await self._opened(storage, options)

    async def _opened(self, storage: str, options: dict) -> EventLog:
        log = await self._open(storage, **options)
        self._logs.append((log, storage))
        return log

    async def close(self) -> None:
        try:
            for log, _ in reversed(self._logs):
                await log.close()
        finally:
            for storage in self._made:
                self._drop(storage)


@pytest.fixture(params=sorted(LOG_BACKENDS))
async def log_factory(request, tmp_path) -> AsyncIterator[LogFactory]:
    if request.param == "postgres":
        require_postgres()
    factory = LogFactory(request.param, tmp_path)
    try:
        yield factory
    finally:
        await factory.close()
