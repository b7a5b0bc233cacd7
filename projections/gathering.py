"""Reads by key gathered into one query while earlier ones are out (a DataLoader, in effect).

A backend with a round trip per read (PostgreSQL) pays most of a read's cost per query, not
per row: under load, the keys asked for while all its reader connections are busy wait
and go together in the next query, so one query answers many requests. With nothing out,
a read is sent at once (on the next turn of the loop, which other reads of that turn join).

A read never misses a write acknowledged before it was asked for: its query is sent after it
is asked, never before. Each waiter gets its own row to decode, so no two callers share one
mutable object.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")


class GatheredReads(Generic[K, R]):
    def __init__(self, fetch: Callable[[list[K]], Awaitable[dict[K, R]]], slots: int):
        """`fetch(keys)` reads the rows of many keys at once (those it finds); at most `slots`
        of its calls are out at a time: as many as the backend has readers."""
        self._fetch = fetch
        self._slots = slots
        self._out = 0
        self._gathering = False  # a read is sent, and gathers the keys asked for until it starts
        self._waiting: dict[K, list[asyncio.Future[R | None]]] = {}
        self._sending: set[asyncio.Task[None]] = set()  # referenced until done: the loop keeps only weak ones

    async def get(self, key: K) -> R | None:
        """The row of `key`, or None if there is none."""
        future: asyncio.Future[R | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(future)
        self._send()
        return await future

    def _send(self) -> None:
        """A read for the keys waiting, unless one is already gathering them or every slot is busy
        (then the next to finish sends one)."""
        if self._gathering or self._out >= self._slots or not self._waiting:
            return
        self._out += 1
        self._gathering = True
        task = asyncio.get_running_loop().create_task(self._read())
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _read(self) -> None:
        await asyncio.sleep(0)  # the reads asked for in this turn of the loop go in this query too
        waiting, self._waiting = self._waiting, {}
        self._gathering = False
        try:
            found = await self._fetch(list(waiting))
        except asyncio.CancelledError:  # the loop is closing: so are the waiters
            for _, future in _unsettled(waiting):
                future.cancel()
            raise
        except Exception as exc:  # the read failed: so does each read it was for
            for _, future in _unsettled(waiting):
                future.set_exception(exc)
        else:
            for key, future in _unsettled(waiting):
                future.set_result(found.get(key))
        finally:
            self._out -= 1
            self._send()


def _unsettled(waiting: dict[K, list[asyncio.Future]]) -> list[tuple[K, asyncio.Future]]:
    """Each waiter still waiting, with its key: one whose caller left is cancelled already."""
    return [(key, future) for key, futures in waiting.items() for future in futures if not future.done()]
