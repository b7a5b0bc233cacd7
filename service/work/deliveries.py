"""What task webhooks and notifications share: a worker's lifetime (its HTTP client, its sends,
a restart after a failure), a signed JSON POST to a checked address with its outcome in words,
and the backoff between attempts.

Each request carries `X-MC-Delivery: <delivery id>` (stable across attempts and restarts:
receivers drop duplicates by it), `X-MC-Event: <the event type>` and, when MC_WEBHOOK_SECRET is
set, `X-MC-Signature: sha256=<hex HMAC-SHA256 of the body keyed with it>`. Where a request may
go, and how its address is checked at each attempt: `service.work.outbound`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Coroutine
from typing import NamedTuple

import httpx
import structlog

from service.settings import Settings
from service.work import outbound
from service.work.jobs import cancelled

SENDS_AT_ONCE = 8
REQUEST_TIMEOUT_SECONDS = 10.0
RESTART_SECONDS = 5.0


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def retry_delay(settings: Settings, attempts: int, last_attempt: float) -> float:
    """Seconds from now until the next attempt: none before the first, then an exponential backoff
    from the last one (epoch seconds)."""
    if not attempts:
        return 0.0
    return max(0.0, last_attempt + settings.webhook_backoff_seconds * 2 ** (attempts - 1) - time.time())


class Outcome(NamedTuple):
    status_code: int | None
    error: str | None
    """None when the receiver answered 2xx; otherwise why the attempt failed, in a sentence."""


class Sender:
    """A delivery worker: `_deliver` runs until it fails, and then again from the log, as a restart would."""

    def __init__(self, settings: Settings, name: str):
        self.settings = settings
        self.name = name
        self.logger = structlog.get_logger(f"mission_control.{name}")
        self._sends: set[asyncio.Task] = set()
        self._slots = asyncio.Semaphore(SENDS_AT_ONCE)
        self._client: httpx.AsyncClient | None = None
        self._main: asyncio.Task | None = None

    def start(self) -> None:
        self._client = outbound.client(REQUEST_TIMEOUT_SECONDS)
        self._main = asyncio.create_task(self._run(), name=self.name)

    async def close(self) -> None:
        await cancelled([*self._sends, *([self._main] if self._main else [])])
        if self._client is not None:
            await self._client.aclose()

    async def _deliver(self) -> None:
        raise NotImplementedError

    def _reset(self) -> None:
        """Forget what was pending: `_deliver` finds it again."""

    async def _run(self) -> None:
        while True:
            try:
                await self._deliver()
            except Exception:
                self.logger.exception(f"the {self.name} worker failed; it starts again from the log")
                for job in self._sends:
                    job.cancel()
                self._reset()
                await asyncio.sleep(RESTART_SECONDS)

    def _spawn(self, job: Coroutine) -> asyncio.Task:
        task = asyncio.create_task(job)
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)
        return task

    async def post(self, url: str, body: bytes, delivery_id: str, event: str) -> Outcome:
        """POST `body` (JSON) signed to `url`, at most SENDS_AT_ONCE at a time; how it went."""
        headers = {
            "Content-Type": "application/json", "X-MC-Delivery": delivery_id, "X-MC-Event": event,
            "User-Agent": f"mission-control-{self.name}",
        }
        if self.settings.webhook_secret:
            headers["X-MC-Signature"] = signature(self.settings.webhook_secret, body)
        assert self._client is not None
        allow = outbound.allowed(self.settings.webhook_allow)
        async with self._slots:
            try:
                response = await outbound.send(self._client, url, allow, content=body, headers=headers)
            except outbound.Refused as refused:  # checked again at each attempt: the name may resolve elsewhere now
                return Outcome(None, f"Not sent: {url} {refused}.")
            except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:  # a URL httpx cannot address too
                return Outcome(None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        status = response.status_code
        return Outcome(status, None if 200 <= status < 300 else f"The receiver answered HTTP {status}.")
