"""Shared fixtures."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from events import EventLog

# Fixtures for tests that talk HTTP: to a real server, `server`, `make_server`, `shared_server`
# (tests/server.py); to the app in this process, `app_server`, `make_app_server`,
# `shared_app_server` (tests/inprocess.py); and `api_server` (tests/api_helpers.py).
pytest_plugins = ["tests.server", "tests.inprocess", "tests.api_helpers"]


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

# --- event logs ----------------------------------------------------------------
#
# `log_factory` runs a test once per backend. A backend is two functions: one that names
# fresh, empty storage for a test, and one that opens a log on it. To add PostgreSQL, add
# its pair to LOG_BACKENDS (e.g. a fresh schema per storage, dropped by the opener's log):
# the log's contract suite and the read models' (read_models(log) picks the backend's) run on it.


def _sqlite_storage(tmp_path: Path, n: int) -> str:
    return str(tmp_path / f"log-{n}.db")


async def _sqlite_open(storage: str, **options) -> EventLog:
    from events.sqlite import SqliteLog

    log = SqliteLog(storage, **options)
    await log.open()
    return log


LOG_BACKENDS: dict[str, tuple[Callable[[Path, int], str], Callable[..., Awaitable[EventLog]]]] = {
    "sqlite": (_sqlite_storage, _sqlite_open),
}


class LogFactory:
    """`await make(**options)` opens a log on fresh storage; every log it opened is closed at teardown."""

    def __init__(self, backend: str, tmp_path: Path):
        self.backend = backend
        self._storage, self._open = LOG_BACKENDS[backend]
        self._tmp_path = tmp_path
        self._logs: list[tuple[EventLog, str]] = []

    async def __call__(self, **options) -> EventLog:
        return await self._opened(self._storage(self._tmp_path, len(self._logs)), options)

    async def reopen(self, log: EventLog, **options) -> EventLog:
        """Another log on the same storage as `log` (which may be closed or still open)."""
        storage = next(s for made, s in self._logs if made is log)
        return await self._opened(storage, options)

    async def _opened(self, storage: str, options: dict) -> EventLog:
        log = await self._open(storage, **options)
        self._logs.append((log, storage))
        return log

    async def close(self) -> None:
        for log, _ in reversed(self._logs):
            await log.close()


@pytest.fixture(params=sorted(LOG_BACKENDS))
async def log_factory(request, tmp_path) -> AsyncIterator[LogFactory]:
    factory = LogFactory(request.param, tmp_path)
    try:
        yield factory
    finally:
        await factory.close()
