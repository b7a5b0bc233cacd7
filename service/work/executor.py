"""One way to execute a run, wherever its desktop is: the Executor, and the Reporter it reports to.

The Executor (built in the runner's place) takes an `Assignment`, a working directory and a
`Reporter`; it runs the agent kind, enforces the timeout, numbers the output into chunks, flushes
it before a question, and ends with one `Ending`. It knows nothing of the log or of HTTP: the
node's own desktop reports straight to the handlers (service/work/local.py), a remote worker over
HTTP (service/work/worker.py).
"""

from __future__ import annotations

from typing import Protocol

from service.work.wire import Ask, Assignment, Chunk, Ending


class LeaseLost(Exception):
    """The server refused a report: the run is no longer this desktop's (cancelled, lapsed,
    superseded by a newer session, or its key revoked). The executor stops the run."""


class Reporter(Protocol):
    async def output(self, run: Assignment, chunks: list[Chunk]) -> int:
        """Record these chunks (in seq order, resends harmless); the seq acknowledged."""

    async def ask(self, run: Assignment, question: Ask) -> None:
        """Record the run's question; its answer arrives as a message."""

    async def finish(self, run: Assignment, ending: Ending) -> str:
        """Record how the run ended; the task's status after it."""
