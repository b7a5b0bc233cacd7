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

Each request: the body is the task as it stood at the triggering event (the API's task JSON);
`X-MC-Signature: sha256=<hex HMAC-SHA256 of the body keyed with MC_WEBHOOK_SECRET>` (absent
when no secret is set), `X-MC-Delivery: <delivery id>`, `X-MC-Event: <the event type>`. Where a
delivery may go, and how its address is checked at each attempt: `service.work.outbound`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import uuid
from datetime import datetime

import httpx
import msgspec
import structlog

from events import EventLog, Meta, RecordedEvent, TypeFilter, decode, streams
from events import types as t
from projections.readmodels import ReadModels
from projections.tasks import served
from service.work import outbound
from service.settings import Settings
from service.work.jobs import cancelled

log = structlog.get_logger("mission_control.webhooks")

STREAM = streams.WEBHOOKS
ACTOR = "mission-control:webhooks"
TRIGGERS = ("task.review", "task.completed", "task.failed", "task.cancelled")
FOLDED = TypeFilter([*TRIGGERS, t.WebhookAttempted.event_type])
SENDS_AT_ONCE = 8
REQUEST_TIMEOUT_SECONDS = 10.0
RESTART_SECONDS = 5.0
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


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookWorker:
    def __init__(self, log_: EventLog, models: ReadModels, settings: Settings):
        self.log = log_
        self.models = models
        self.settings = settings
        self.pending: dict[str, Delivery] = {}
        self.folded = 0
        """The position of the last event folded."""
        self.live = False
        """Past the history at start-up: only then is anything sent, so every attempt already
        on the record is known first."""
        self._sends: set[asyncio.Task] = set()
        self._slots = asyncio.Semaphore(SENDS_AT_ONCE)
        self._client: httpx.AsyncClient | None = None
        self._main: asyncio.Task | None = None

    def start(self) -> None:
        self._client = outbound.client(REQUEST_TIMEOUT_SECONDS)
        self._main = asyncio.create_task(self._run(), name="webhooks")

    async def close(self) -> None:
        await cancelled([*self._sends, *([self._main] if self._main else [])])
        if self._client is not None:
            await self._client.aclose()

    @property
    def checkpoint(self) -> int:
        if self.pending:
            return min(d.position for d in self.pending.values()) - 1
        return self.folded

    async def _run(self) -> None:
        while True:
            try:
                await self._deliver()
            except Exception:  # start over from the checkpoint, as a restart would
                log.exception("the webhook worker failed; it starts again from its checkpoint")
                for job in self._sends:
                    job.cancel()
                self.pending, self.live = {}, False
                await asyncio.sleep(RESTART_SECONDS)

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
            delivery.attempts, delivery.last_attempt = data.attempt, _epoch(event.recorded_at)
            if data.ok or delivery.attempts >= self.settings.webhook_attempts:
                del self.pending[delivery.id]
                if not data.ok:
                    log.warning("webhook delivery given up", delivery_id=delivery.id, url=delivery.url)
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
        delay = 0.0
        if delivery.attempts:
            backoff = self.settings.webhook_backoff_seconds * 2 ** (delivery.attempts - 1)
            delay = max(0.0, delivery.last_attempt + backoff - time.time())
        job = asyncio.create_task(self._attempt(delivery, delay))
        self._sends.add(job)
        job.add_done_callback(self._sends.discard)

    async def _attempt(self, delivery: Delivery, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await self._send_and_record(delivery)
        except Exception:  # nothing was recorded, so the delivery is still pending: try it again later
            log.exception("a webhook attempt could not be made or recorded", delivery_id=delivery.id)
            await asyncio.sleep(self.settings.webhook_backoff_seconds)
            if delivery.id in self.pending:
                self._schedule(delivery)

    async def _send_and_record(self, delivery: Delivery) -> None:
        async with self._slots:
            task = await self.models.task_as_of(delivery.task_id, delivery.position)
            body = msgspec.json.encode(served(task) if task is not None else None)
            headers = {
                "Content-Type": "application/json", "X-MC-Delivery": delivery.id, "X-MC-Event": delivery.event,
                "User-Agent": "mission-control-webhooks",
            }
            if self.settings.webhook_secret:
                headers["X-MC-Signature"] = signature(self.settings.webhook_secret, body)
            assert self._client is not None
            status, error = None, None
            allow = outbound.allowed(self.settings.webhook_allow)
            try:
                response = await outbound.send(self._client, delivery.url, allow, content=body, headers=headers)
                status = response.status_code
                if not 200 <= status < 300:
                    error = f"The receiver answered HTTP {status}."
            except outbound.Refused as refused:  # checked again at each attempt: the name may resolve elsewhere now
                error = f"Not sent: {delivery.url} {refused}."
            except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:  # a URL httpx cannot address too
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        attempt = t.WebhookAttempted(
            delivery_id=delivery.id, task_id=delivery.task_id, url=delivery.url,
            attempt=delivery.attempts + 1, ok=error is None, status_code=status, error=error,
            checkpoint=self.checkpoint,
        )
        # The fold of this very event schedules the next attempt, if any. Its cause is the triggering event.
        await self.log.append(STREAM, [attempt], meta=Meta(actor=ACTOR, causation_id=str(delivery.position)))


def _epoch(recorded_at: str) -> float:
    return datetime.fromisoformat(recorded_at.replace("Z", "+00:00")).timestamp()
