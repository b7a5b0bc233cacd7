"""GET /metrics: Prometheus figures of one app, in a registry of its own.

Requests are counted by the middleware (`observe_request`), group commits by the log's
`on_batch` hook (`attach`), stream connections around the stream's route (`counting`); the rest
is read from the log and the read models at scrape time, so it is never stale and costs nothing
between scrapes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from events import EventLog
from projections.readmodels import ReadModels

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mc_http_requests", "HTTP requests by route (the handler's name) and status.",
            ["method", "route", "status"], registry=r,
        )
        self.request_seconds = Histogram(
            "mc_http_request_duration_seconds", "Time to answer an HTTP request (a stream: its whole life).",
            ["method", "route"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "mc_log_append_batch_size", "Appends committed together in one transaction (group commit).",
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.batch_seconds = Histogram(
            "mc_log_append_batch_seconds", "Time to commit one batch of appends, fsync included.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.head = Gauge("mc_log_head", "The last position of the log.", registry=r)
        self.streams = Gauge("mc_log_streams", "Streams in the log.", registry=r)
        self.lag = Gauge(
            "mc_projection_lag_events", "Events in the log that the read models have not folded yet.", registry=r,
        )
        self.subscribers = Gauge(
            "mc_stream_subscribers", "Activity stream connections open now.", registry=r,
        )
        self.tasks = Gauge(
            "mc_tasks", "Tasks by status: running and awaiting_input are runs in flight; review, done, failed "
            "and cancelled are how the last runs ended.", ["status"], registry=r,
        )
        self.run_slots = Gauge("mc_run_slots", "Runs that may be in flight at once (MC_MAX_CONCURRENT).", registry=r)
        self.approvals_pending = Gauge("mc_approvals_pending", "Approvals waiting for a decision.", registry=r)
        self._children: dict[tuple[str, str, int], tuple] = {}

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        # A labelled child looked up once per (method, route, status): `labels()` costs more than
        # the increment, and routes and statuses are few.
        children = self._children.get((method, route, status))
        if children is None:
            children = self._children[(method, route, status)] = (
                self.requests.labels(method, route, str(status)), self.request_seconds.labels(method, route),
            )
        children[0].inc()
        children[1].observe(seconds)

    def observe_batch(self, appends: int, seconds: float) -> None:
        self.batch_size.observe(appends)
        self.batch_seconds.observe(seconds)

    def attach(self, log: EventLog) -> None:
        log.on_batch = self.observe_batch

    def counting(self, routes: list[Route]) -> list[Route]:
        """The routes, each counted in `mc_stream_subscribers` while its answer is being sent."""
        for route in routes:
            answer = route.app

            async def counted(scope: Scope, receive: Receive, send: Send, answer=answer) -> None:
                self.subscribers.inc()
                try:
                    await answer(scope, receive, send)
                finally:
                    self.subscribers.dec()

            route.app = counted
        return routes

    async def refresh(self, log: EventLog, models: ReadModels, max_concurrent: int) -> None:
        """The gauges read from the log and the read models."""
        figures = await models.counters()
        head = await log.read_head()
        self.head.set(head)
        self.streams.set(figures.streams)
        self.lag.set(max(0, head - figures.checkpoint))
        for status, count in figures.tasks.items():
            self.tasks.labels(status).set(count)
        self.run_slots.set(max_concurrent)
        self.approvals_pending.set(figures.approvals_pending)
