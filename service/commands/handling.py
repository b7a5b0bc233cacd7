"""Carrying out a command: load the state, decide, append at the state's version.

A lost race (another append moved the stream) is decided again on the fresh state,
so no command is ever applied twice or on a state it did not see.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from events import EventLog, Meta, RecordedEvent, WrongExpectedVersion, streams, typed
from events.types import EventData
from projections import desktops
from projections.desktops import Desktop
from projections.readmodels import ReadModels
from projections.tasks import Task, evolve
from service.commands.deciders import (
    CancelTask, Command, CreateTask, FailRun, FinishRun, LoseRun, Refused, Review, decide,
)
from service.commands.desktops import decide_desktop

ATTEMPTS = 10
ENDING_COMMANDS = (FinishRun, FailRun, CancelTask, LoseRun, Review)
"""The commands that may end a run or settle a dependency (done, failed, cancelled)."""


class Idempotency:
    """An `Idempotency-Key` and the fingerprint of the request that carried it."""

    def __init__(self, key: str, fingerprint: str):
        self.key, self.fingerprint = key, fingerprint


class Commands:
    def __init__(self, log: EventLog, models: ReadModels):
        self.log = log
        self.models = models
        self._keys: dict[str, tuple[asyncio.Lock, int]] = {}
        """Idempotency keys in use, with their lock and how many requests hold or await it."""

    def admission(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Held while a run is admitted, by one request at a time in every process on the log, so
        the concurrency limit and each desktop's capacity hold at every position."""
        return self.log.exclusive("admission")

    async def task(
        self,
        task_id: str,
        command: Command | Callable[[Task | None], Awaitable[Command]],
        meta: Meta,
        idempotency: Idempotency | None = None,
        if_match: set[int] | None = None,
        known: Task | None = None,
    ) -> tuple[Task, list[RecordedEvent]]:
        """Decide and append; returns the task after the append and what was recorded.

        With `if_match`, the versions the client's `If-Match` accepts: a task at any other version,
        even one reached during a lost race, answers 412 instead of being decided again.
        With `idempotency`, a key already used answers the task as that first request left
        it, and an empty list: nothing was recorded now, so the caller starts nothing again.
        `known`, the task as the caller just loaded it, is decided on first (a lost race
        reloads it) and lends the answer its watchers; without it the answer has none.
        """
        # An ending frees a slot, a desktop's slot or a dependency: decided under the admission lock
        # too, so an admission and a dispatch pass never judge a state that changes under them.
        held = self.admission() if isinstance(command, ENDING_COMMANDS) else contextlib.nullcontext()
        async with held:
            if idempotency is None:
                return await self._task(task_id, command, meta, None, if_match, known)
            async with self._holding(idempotency.key):
                earlier = await self.replay(idempotency)
                if earlier is not None:
                    return earlier, []
                return await self._task(task_id, command, meta, idempotency, if_match, known)

    async def replay(
        self, idempotency: Idempotency, may_see: Callable[[Task], Awaitable[bool]] | None = None
    ) -> Task | None:
        """The task as the first request with this key left it; None if the key is new. Refused
        when that was another request: another route or body, or (by `may_see`) a task this
        caller may not see."""
        earlier = await self.log.idempotent(idempotency.key)
        if earlier is None:
            return None
        fingerprint, recorded = earlier
        task = await self._as_recorded(recorded) if fingerprint == idempotency.fingerprint else None
        if task is None or (may_see is not None and not await may_see(task)):
            raise Refused("idempotency_conflict", "This Idempotency-Key was used with a different request.")
        return task

    @contextlib.asynccontextmanager
    async def _holding(self, key: str) -> AsyncIterator[None]:
        """Requests racing with one key run one after the other, so the later ones find the
        first one's events and answer with them. (The log alone would append nothing twice,
        but could not tell the caller that its answer is a replay.)"""
        lock, users = self._keys.get(key, (asyncio.Lock(), 0))
        self._keys[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._keys[key]
            if users == 1:
                del self._keys[key]
            else:
                self._keys[key] = (lock, users - 1)

    async def _as_recorded(self, recorded: list[RecordedEvent]) -> Task:
        """The task as an earlier append with the same key left it."""
        task = await self.models.task_as_of(streams.parse(recorded[-1].stream).id, recorded[-1].position)
        assert task is not None  # a key's fingerprint names its route: its events are this task's
        return task

    async def _task(
        self,
        task_id: str,
        command: Command | Callable[[Task | None], Awaitable[Command]],
        meta: Meta,
        idempotency: Idempotency | None,
        if_match: set[int] | None,
        known: Task | None,
    ) -> tuple[Task, list[RecordedEvent]]:
        watchers = known.watchers if known else []
        state = known
        for attempt in range(ATTEMPTS):
            # A task is created under an id minted for it just now: no need to read it first.
            # Were it taken after all, the append's expected version refuses, and it is read.
            if state is None and not (attempt == 0 and isinstance(command, CreateTask)):
                state = await self.models.task(task_id, with_watchers=False)
            if if_match is not None and state is not None and state.version not in if_match:
                named = ", ".join(str(v) for v in sorted(if_match))
                raise Refused("precondition_failed", f"The task is at version {state.version}, not {named}.")
            concrete = command if isinstance(command, Command) else await command(state)
            events = decide(state, concrete)
            if not events:
                assert state is not None  # deciders append nothing only to an existing task
                state.watchers = watchers
                return state, []
            try:
                recorded = await self.append(
                    streams.task(task_id), events, state.version if state else 0, meta, idempotency
                )
            except WrongExpectedVersion:
                state = None  # decide again on the task as it is now
                continue
            if idempotency is not None and recorded[0].version <= (state.version if state else 0):
                # The key was used already (by another process): the answer of that first request.
                task = await self._as_recorded(recorded)
            else:  # appended now, on the state decided on (never a fold of the whole stream, output included)
                task = state
                for event in recorded:
                    task = evolve(task, typed(event))
            assert task is not None
            task.watchers = watchers
            return task, recorded
        raise Refused("conflict", "The task kept changing while this request was decided; try again.")

    async def desktop(
        self, desktop_id: str, command: Command, meta: Meta
    ) -> tuple[Desktop | None, list[RecordedEvent]]:
        """Decide a desktop command and append at the stream's version; the desktop after it (None
        once removed) and what was recorded. A lost race is decided again on the fresh desktop."""
        stream = streams.desktop(desktop_id)
        for _ in range(ATTEMPTS):
            state = await self.models.desktop(desktop_id)
            if state is not None:
                expected = state.stream_version
            else:  # unknown, or removed: its stream (if any) goes on from its last event
                last = await self.log.last_event(stream)
                expected = last.version if last else 0
                if await self.models.desktop(desktop_id) is not None:
                    continue  # registered between the two reads: `expected` is not the version `state` is at
            events = decide_desktop(desktop_id, state, command)
            if not events:
                return state, []
            try:
                recorded = await self.append(stream, events, expected, meta)
            except WrongExpectedVersion:
                continue
            for event in recorded:
                state = desktops.evolve(state, typed(event))
            return state, recorded
        raise Refused("conflict", f"Desktop {desktop_id} kept changing while this request was decided; try again.")

    async def append(
        self, stream: str, events: list[EventData], expected: int | None, meta: Meta,
        idempotency: Idempotency | None = None,
    ) -> list[RecordedEvent]:
        return await self.log.append(
            stream, events, expected=expected, meta=meta,
            idempotency_key=idempotency.key if idempotency else None,
            fingerprint=idempotency.fingerprint if idempotency else None,
        )
