"""Carrying out a command: load the state, decide, append at the state's version.

A lost race (another append moved the stream) is decided again on the fresh state,
so no command is ever applied twice or on a state it did not see.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from events import EventLog, Meta, RecordedEvent, WrongExpectedVersion, typed
from events.types import EventData
from projections import queries
from projections.tasks import Task, evolve
from service.deciders import Command, Rejected, decide

ATTEMPTS = 10


class Idempotency:
    """An `Idempotency-Key` and the fingerprint of the request that carried it."""

    def __init__(self, key: str, fingerprint: str):
        self.key, self.fingerprint = key, fingerprint


class Commands:
    def __init__(self, log: EventLog):
        self.log = log
        self.admission = asyncio.Lock()
        """Held while a run is admitted, so the concurrency limit holds at every position."""

    async def task(
        self,
        task_id: str,
        command: Command | Callable[[Task | None], Awaitable[Command]],
        meta: Meta,
        idempotency: Idempotency | None = None,
    ) -> tuple[Task, list[RecordedEvent]]:
        """Decide and append; returns the task after the append and what was recorded."""
        for _ in range(ATTEMPTS):
            state = await queries.task(self.log, task_id)
            concrete = command if isinstance(command, Command) else await command(state)
            events = decide(state, concrete)
            if not events:
                assert state is not None  # deciders append nothing only to an existing task
                return state, []
            try:
                recorded = await self.append(
                    f"task-{task_id}", events, state.version if state else 0, meta, idempotency
                )
            except WrongExpectedVersion:
                continue
            if idempotency is not None:  # the answer of the first request with this key
                task = await queries.task_as_of(self.log, task_id, recorded[-1].position)
            else:
                task = state
                for event in recorded:
                    task = evolve(task, typed(event))
            assert task is not None
            task.watchers = state.watchers if state else []
            return task, recorded
        raise Rejected(409, "conflict", "The task kept changing while this request was decided; try again.")

    async def append(
        self, stream: str, events: list[EventData], expected: int | None, meta: Meta,
        idempotency: Idempotency | None = None,
    ) -> list[RecordedEvent]:
        return await self.log.append(
            stream, events, expected=expected, meta=meta,
            idempotency_key=idempotency.key if idempotency else None,
            fingerprint=idempotency.fingerprint if idempotency else None,
        )
