"""Every upcaster Mission Control has shipped, one per (event type, old schema).

`events.envelope.decode` imports this module, so whatever decodes events into types
(deciders, projections) reads old payloads as today's types. Never edit or remove one:
logs written with that schema exist somewhere.
"""

from __future__ import annotations

from typing import get_args

from events.types import FailureKind
from events.upcast import Payload, upcaster

_FAILURE_KINDS = frozenset(get_args(FailureKind))


@upcaster("task.failed", 1)
def task_failed_reason_to_failure_kind(payload: Payload) -> Payload:
    """Schema 1 said why in free text; schema 2's `reason` is a FailureKind.
    The reasons schema-1 writers used are kinds already; any other becomes `error`, and
    the old word is kept at the front of the message so nothing is lost."""
    upcast = dict(payload)
    reason = upcast["reason"]
    if reason not in _FAILURE_KINDS:
        upcast["reason"], upcast["error"] = "error", f"{reason}: {upcast['error']}"
    return upcast


@upcaster("settings.recorded", 1)
def settings_lease_seconds_to_milliseconds(payload: Payload) -> Payload:
    """Schema 1's `leaseSeconds`, a float, as schema 2's whole `leaseMilliseconds`."""
    upcast = dict(payload)
    upcast["leaseMilliseconds"] = round(upcast.pop("leaseSeconds") * 1000)
    return upcast
