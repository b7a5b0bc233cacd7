"""Webhooks: a task with a `webhookUrl` gets a POST of its JSON when it reaches review, done,
failed or cancelled.

Delivery is driven from the log. The worker folds the events that trigger a delivery and the
`webhook.attempted` events that record each attempt's outcome (stream `webhooks`), and sends
what the fold says is due: the first attempt at once, each retry after an exponential backoff,
until one succeeds (2xx) or `webhook_attempts` have failed. Nothing outside the log is kept:
every attempt records the worker's checkpoint (a position at or before which every delivery
had concluded), and a restarted worker refolds from the last recorded checkpoint, so pending
deliveries resume with their attempt counts, and one recorded as delivered is never sent again.
A crash between a receiver's 2xx and its record sends that attempt again: receivers drop
duplicates by `X-MC-Delivery`, which is stable across attempts and restarts.

Each request's body is the task as it stood at the triggering event (the API's task JSON); its
headers, signature and address check are those of every delivery (`service.work.deliveries`).
"""

from __future__ import annotations

import asyncio
import uuid

import msgspec

from events import EventLog, Meta, RecordedEvent, TypeFilter, decode, parse_rfc3339, streams
from events import types as t
from projections.readmodels import ReadModels
from projections.tasks import served
from service.settings import Settings
from service.work import deliveries

STREAM = streams.WEBHOOKS
ACTOR = "mission-control:webhooks"
TRIGGERS = ("task.review", "task.completed", "task.failed", "task.cancelled")
FOLDED = TypeFilter([*TRIGGERS, t.WebhookAttempted.event_type])
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "mission-control:webhook")


class Delivery(msgspec.Struct, kw_only=True):
    id: str
    task_id: str
    url: str
    position: int
    """Of the event that triggered it."""
    event: str
    attempts: int = 0
    last_attempt: float = 0.0
    """When the last attempt was recorded (epoch seconds)."""


def delivery_id(position: int) -> str:
    """One delivery per triggering event, named by its position: stable across restarts."""
    return str(uuid.uuid5(_NAMESPACE, str(position)))


class WebhookWorker(deliveries.Sender):
    def __init__(self, log_: EventLog, models: ReadModels, settings: Settings):
        super().__init__(settings, "webhooks")
        self.log = log_
        self.models = models
        self.pending: dict[str, Delivery] = {}
        self.folded = 0
        """The position of the last event folded."""
        self.live = False
        """Past the history at start-up: only then is anything sent, so every attempt already
        on the record is known first."""

    @property
    def checkpoint(self) -> int:
        if self.pending:
            return min(d.position for d in self.pending.values()) - 1
        return self.folded

    def _reset(self) -> None:
        self.pending, self.live = {}, False

    async def _deliver(self) -> None:
        after = await self._resume_point()
        head = await self.log.read_head()
        while after < head:
            page = await self.log.read_all(after, 500, types=FOLDED, until=head)
            for event in page.events:
                await self._fold(event)
            after = page.next
        self.live = True
        for delivery in list(self.pending.values()):
            self._schedule(delivery)
        async for event in self.log.tail(head, types=FOLDED):
            await self._fold(event)

    async def _resume_point(self) -> int:
        last = await self.log.last_event(STREAM)
        return decode(last).checkpoint if last else 0  # type: ignore[attr-defined]

    async def _fold(self, event: RecordedEvent) -> None:
        self.folded = event.position
        data = decode(event)
        if isinstance(data, t.WebhookAttempted):
            delivery = self.pending.get(data.delivery_id)
            if delivery is None or data.attempt <= delivery.attempts:
                return  # concluded before the checkpoint, or an attempt already counted
            delivery.attempts, delivery.last_attempt = data.attempt, parse_rfc3339(event.recorded_at).timestamp()
            if data.ok or delivery.attempts >= self.settings.webhook_attempts:
                del self.pending[delivery.id]
                if not data.ok:
                    self.logger.warning("webhook delivery given up", delivery_id=delivery.id, url=delivery.url)
            elif self.live:
                self._schedule(delivery)
            return
        task = await self.models.task(data.task_id, with_watchers=False)  # type: ignore[attr-defined]
        if task is None or not task.webhook_url:
            return
        delivery = Delivery(
            id=delivery_id(event.position), task_id=task.id, url=task.webhook_url,
            position=event.position, event=event.type,
        )
        self.pending[delivery.id] = delivery
        if self.live:
            self._schedule(delivery)

    def _schedule(self, delivery: Delivery) -> None:
        delay = deliveries.retry_delay(self.settings, delivery.attempts, delivery.last_attempt)
        self._spawn(self._attempt(delivery, delay))

    async def _attempt(self, delivery: Delivery, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await self._send_and_record(delivery)
        except Exception:  # nothing was recorded, so the delivery is still pending: try it again later
            self.logger.exception("a webhook attempt could not be made or recorded", delivery_id=delivery.id)
            await asyncio.sleep(self.settings.webhook_backoff_seconds)
            if delivery.id in self.pending:
                self._schedule(delivery)

    async def _send_and_record(self, delivery: Delivery) -> None:
        task = await self.models.task_as_of(delivery.task_id, delivery.position)
        body = msgspec.json.encode(served(task) if task is not None else None)
        status, error = await self.post(delivery.url, body, delivery.id, delivery.event)
        attempt = t.WebhookAttempted(
            delivery_id=delivery.id, task_id=delivery.task_id, url=delivery.url,
            attempt=delivery.attempts + 1, ok=error is None, status_code=status, error=error,
            checkpoint=self.checkpoint,
        )
        # The fold of this very event schedules the next attempt, if any. Its cause is the triggering event.
        await self.log.append(STREAM, [attempt], meta=Meta(actor=ACTOR, causation_id=str(delivery.position)))
