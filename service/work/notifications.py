"""Notifications: a watcher's devices are told when a task they watch needs them or ends.

Who is told of what is decided by the read models' fold of the log (projections/notifications.py):
each decision is a pending notification there, under a delivery id derived from its cause and
device, until the `notification.sent` or final `notification.failed` this worker records (in the
user's `devices-<user>` stream) concludes it. The worker sends what is pending at start-up, then
what each new cause makes pending; each delivery is attempted until it concludes, retried with the
task webhooks' backoff and attempt count (`MC_WEBHOOK_BACKOFF_SECONDS`, `MC_WEBHOOK_ATTEMPTS`).
Nothing but the log is kept, so a restart resumes with the attempt counts recorded; a crash
between a receiver's 2xx and its record sends that attempt again under the same delivery id.

A `webhook` device gets a signed JSON POST (`service.work.deliveries`), a `slack` one a Slack
incoming-webhook body, a `browser` one nothing but the `notification.sent` event itself, which its
user alone sees on the activity stream. The device is read at each attempt: one removed since is
told nothing (a final failure), one registered again gets its new address.
"""

from __future__ import annotations

import asyncio

import msgspec

from events import EventLog, Meta, TypeFilter, parse_rfc3339, streams
from events import types as t
from projections.devices import Device
from projections.notifications import Pending
from projections.readmodels import ReadModels
from projections.tasks import Task, served
from service.settings import Settings
from service.work import deliveries

ACTOR = "mission-control:notifications"
CAUSES = TypeFilter(list(t.NOTIFY_ON))
HAPPENED = {
    "task.review": "is waiting for your review", "task.input_requested": "is asking for input",
    "task.failed": "failed", "task.completed": "is done",
}


def sentence(task: Task | None, cause: t.Cause) -> str:
    """What a person is told: which task, what happened, and where to find it."""
    if task is None:
        return f"A task {HAPPENED[cause.type]}."
    name = f'"{task.title}"' if task.title else f"Task {task.id[:8]}"
    detail = ""
    if cause.type == "task.input_requested" and task.input_prompt:
        detail = f": {task.input_prompt[:200]}"
    elif cause.type == "task.failed" and task.error:
        detail = f": {task.error[:200]}"
    return f"{name} {HAPPENED[cause.type]}{detail} (task {task.id}, event {cause.position})."


class Notifier(deliveries.Sender):
    def __init__(self, log: EventLog, models: ReadModels, settings: Settings):
        super().__init__(settings, "notifications")
        self.log = log
        self.models = models
        self._delivering: dict[str, asyncio.Task] = {}
        """A job per pending delivery, until it concludes."""

    def _reset(self) -> None:
        self._delivering = {}

    async def _deliver(self) -> None:
        head = await self.log.read_head()
        self._take(await self.models.pending_notifications())
        async for event in self.log.tail(head, types=CAUSES):
            # Its append folded it (every process that appends task events keeps the read models).
            self._take(await self.models.pending_notifications(event.position))

    def _take(self, found: list[Pending]) -> None:
        for pending in found:
            if pending.id not in self._delivering:
                self._delivering[pending.id] = self._spawn(self._until_concluded(pending.id))

    async def _until_concluded(self, delivery_id: str) -> None:
        try:
            while True:
                try:
                    pending = await self.models.pending_notification(delivery_id)
                    if pending is None:
                        return  # concluded: sent, or given up
                    last = parse_rfc3339(pending.last_attempt_at).timestamp() if pending.last_attempt_at else 0.0
                    await asyncio.sleep(deliveries.retry_delay(self.settings, pending.attempts, last))
                    await self._attempt(pending)
                except Exception:  # nothing was recorded: the delivery is still pending, tried again later
                    self.logger.exception("a notification could not be sent or recorded", delivery_id=delivery_id)
                    await asyncio.sleep(self.settings.webhook_backoff_seconds)
        finally:
            self._delivering.pop(delivery_id, None)

    async def _attempt(self, pending: Pending) -> None:
        device = next((d for d in await self.models.devices(pending.user_id) if d.device_id == pending.device_id), None)
        task = await self.models.task_as_of(pending.task_id, pending.cause.position)
        text = sentence(task, pending.cause)
        attempt = pending.attempts + 1
        common = dict(
            delivery_id=pending.id, device_id=pending.device_id, task_id=pending.task_id, cause=pending.cause,
            attempt=attempt,
        )
        if device is None:
            event: t.EventData = t.NotificationFailed(
                **common, error=f"Device {pending.device_id} was removed before it was told.", final=True,
            )
        elif device.kind == "browser":  # this event is what the browser is shown
            event = t.NotificationSent(**common, text=text)
        else:
            assert device.url is not None  # required of webhook and slack devices
            outcome = await self.post(device.url, self._body(device, pending, task, text), pending.id, pending.cause.type)
            if outcome.error is None:
                event = t.NotificationSent(**common, text=text, status_code=outcome.status_code)
            else:
                event = t.NotificationFailed(
                    **common, error=outcome.error, status_code=outcome.status_code,
                    final=attempt >= self.settings.webhook_attempts,
                )
                if event.final:
                    self.logger.warning("notification given up", delivery_id=pending.id, device_id=pending.device_id)
        await self.log.append(
            streams.devices(pending.user_id), [event],
            meta=Meta(actor=ACTOR, causation_id=str(pending.cause.position)),
        )

    @staticmethod
    def _body(device: Device, pending: Pending, task: Task | None, text: str) -> bytes:
        if device.kind == "slack":
            return msgspec.json.encode({"text": text})
        return msgspec.json.encode({
            "deliveryId": pending.id, "deviceId": pending.device_id, "event": pending.cause.type,
            "cause": pending.cause, "taskId": pending.task_id, "text": text,
            "task": served(task) if task is not None else None,
        })
