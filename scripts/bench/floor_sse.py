"""The floor of `bench.py sse`: a bare sse-starlette broadcast, served by uvicorn as
`scripts.bench.floor_sse:app` in a process of its own."""

from __future__ import annotations

import asyncio

from sse_starlette.sse import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

def bare_app() -> Starlette:
    """What the activity stream is measured against: sse-starlette as its README shows it,
    broadcasting events published to it from an in-memory list."""
    published: list[tuple[int, str]] = []
    state = {"new": asyncio.Event()}

    async def stream(request: Request) -> Response:
        async def events():
            at = len(published)
            while True:
                new = state["new"]
                while at < len(published):
                    position, data = published[at]
                    yield ServerSentEvent(data=data, id=str(position))
                    at += 1
                await new.wait()

        return EventSourceResponse(events(), ping=15)

    async def publish(request: Request) -> Response:
        published.append((len(published) + 1, (await request.body()).decode()))
        state["new"].set()
        state["new"] = asyncio.Event()
        return Response(status_code=204)

    return Starlette(routes=[Route("/stream", stream), Route("/publish", publish, methods=["POST"])])


app = bare_app()
