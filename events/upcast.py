"""Upcasters: old payload shapes turned into the current one on read.

The log keeps every event exactly as it was written, with the schema version in its
meta. Code that decodes events into types (deciders, projections) goes through
`upcast`, so a log written years ago stays readable by today's types.
Register a function per (event type, old schema) that returns the next schema's payload.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from events.types import EVENT_TYPES

Payload = dict[str, Any]
UPCASTERS: dict[tuple[str, int], Callable[[Payload], Payload]] = {}


def upcaster(event_type: str, from_schema: int):
    def register(fn: Callable[[Payload], Payload]) -> Callable[[Payload], Payload]:
        UPCASTERS[(event_type, from_schema)] = fn
        return fn

    return register


def upcast(event_type: str, schema: int, payload: Payload) -> Payload:
    current = EVENT_TYPES[event_type].schema
    while schema < current:
        step = UPCASTERS.get((event_type, schema))
        if step is None:
            raise LookupError(f"no upcaster for {event_type} from schema {schema}")
        payload = step(payload)
        schema += 1
    return payload
