"""Artifacts: files staged for a task's next run, and the files its runs took in and left behind
(API.md, "Artifacts"). The bytes go to the artifact store (service/artifacts) as they arrive,
hashed on the way and never held whole; the event naming them is appended once they are durable.
A worker fetches its run's inputs and uploads its outputs here too, under the run's lease; the
outputs are recorded with the run's ending (service/work/reports.py)."""

from __future__ import annotations

import re
import urllib.parse

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from events import TypeFilter, streams, typed
from projections import artifacts
from projections.artifacts import Artifact, File
from service.api import API_PREFIX
from service.api.tenancy import visible_task
from service.api.worker import _identity, _run
from service.artifacts import (
    DEFAULT_TYPE, MEDIA_TYPE, SHA256, ArtifactStore, Empty, Full, NotStored, TooLarge, name_problem,
)
from service.commands.deciders import Refused, StageArtifact
from service.commands.requests import meta
from service.http.auth import WORKER, Principal
from service.http.errors import HttpError, bad_request, body_too_large, json_response
from service.http.endpoints import LEASE, endpoint

UPLOADS = re.compile(rf"^{re.escape(API_PREFIX)}/(tasks|worker/runs)/[^/]+/artifacts/.")
_TYPES = TypeFilter(artifacts.TYPES)
MAX_CONTENT_TYPE = 255


def takes_upload(method: str, path: str) -> bool:
    """Whether the request's body is an artifact's bytes (not JSON, up to `max_artifact_bytes`): the
    middleware's size check reads it before any route is matched."""
    return method == "PUT" and UPLOADS.match(path) is not None


def disposition(name: str) -> str:
    """`attachment` naming the file: an ASCII fallback for old clients, and the name itself in RFC
    5987's `filename*` (RFC 6266), so no quote, backslash or non-ASCII character can break the header."""
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\%' else "_" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{urllib.parse.quote(name, safe='')}"


def _named(request: Request) -> str:
    name = request.path_params["name"]
    problem = name_problem(name)
    if problem is not None:
        raise bad_request(problem, "invalid_name")
    return name


def _content_type(request: Request) -> str:
    given = request.headers.get("content-type", "").strip() or DEFAULT_TYPE
    if len(given) > MAX_CONTENT_TYPE or not MEDIA_TYPE.match(given):
        raise bad_request(f"Content-Type {given[:80]!r} is no media type (type/subtype, then parameters).")
    return given


async def receive(request: Request, name: str, content_type: str) -> File:
    """The body stored, as the file it is; refused (nothing kept) if empty, too large or out of room."""
    store: ArtifactStore = request.state.artifacts
    limit = request.app.state.settings.max_artifact_bytes
    try:
        stored = await store.put(request.stream(), limit)
    except TooLarge:
        raise body_too_large(limit) from None
    except Empty:
        raise bad_request(f"The artifact {name!r} has no bytes: send the file as the request body.") from None
    except Full as full:
        raise HttpError(507, "insufficient_storage", f"{full} Nothing was recorded; free some space and "
                        "send it again.") from None
    return File(name=name, sha256=stored.sha256, size=stored.size, content_type=content_type)


async def task_artifacts(request: Request, task_id: str) -> list[Artifact]:
    events = await request.state.log.read_stream(streams.task(task_id), types=_TYPES)
    return artifacts.artifacts(typed(e) for e in events)


async def serve(request: Request, artifact: File) -> Response:
    store: ArtifactStore = request.state.artifacts
    chunks = store.get(artifact.sha256)
    try:
        first = await anext(chunks, b"")
    except NotStored:
        raise Refused("not_found", f"Artifact {artifact.sha256} is recorded, but its bytes are not in the store; "
                      "`mission-control verify` names every artifact that is missing.") from None

    async def body():
        yield first
        async for chunk in chunks:
            yield chunk

    return StreamingResponse(body(), headers={
        "Content-Type": artifact.content_type, "Content-Length": str(artifact.size),
        "Content-Disposition": disposition(artifact.name), "ETag": f'"{artifact.sha256}"',
        # Bytes anyone may have uploaded, served from the API's origin: never run as a page there.
        "X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox",
    })


def _sha256(request: Request) -> str:
    sha256 = request.path_params["sha256"]
    if not SHA256.match(sha256):
        raise bad_request(f"{sha256[:80]!r} is no SHA-256: 64 lowercase hexadecimal digits.")
    return sha256


@endpoint(
    summary="Stage a file for the task's next run (a second one of the same name before it starts replaces it).",
    scope="task:write", upload=True, status=201, answer=Artifact, errors=(404,),
)
async def stage(request: Request, who: Principal) -> Response:
    task = await visible_task(request, who)
    name, content_type = _named(request), _content_type(request)
    file = await receive(request, name, content_type)
    _, recorded = await request.state.commands.task(task.id, StageArtifact(file=file), meta(request, who), known=task)
    return json_response(Artifact(
        name=file.name, sha256=file.sha256, size=file.size, content_type=file.content_type, run_id=None,
        direction="input", created_at=recorded[-1].recorded_at,
    ), 201)


@endpoint(
    summary="The task's artifacts, oldest first: staged ones (runId null), and each run's inputs and outputs.",
    scope="task:read", answer=list[Artifact],
)
async def list_artifacts(request: Request, who: Principal) -> Response:
    task = await visible_task(request, who)
    return json_response(await task_artifacts(request, task.id))


@endpoint(
    summary="An artifact's bytes, with its recorded content type and a Content-Disposition naming the file.",
    scope="task:read", media="application/octet-stream",
)
async def download(request: Request, who: Principal) -> Response:
    task = await visible_task(request, who)
    sha256 = _sha256(request)
    found = [a for a in await task_artifacts(request, task.id) if a.sha256 == sha256]
    if not found:
        raise Refused("not_found", f"Task {task.id} has no artifact {sha256}.")
    return await serve(request, found[-1])


@endpoint(
    summary="One of the run's inputs, by its SHA-256.", scope=WORKER, media="application/octet-stream",
    params=(LEASE,), errors=(409,),
)
async def run_input(request: Request, who: Principal) -> Response:
    run_id, lease = _run(request)
    task = await request.state.reports.leased(_identity(who), run_id, lease)
    sha256 = _sha256(request)
    found = [a for a in await task_artifacts(request, task.id)
             if a.run_id == run_id and a.direction == "input" and a.sha256 == sha256]
    if not found:
        raise Refused("not_found", f"Run {run_id} has no input {sha256}.")
    return await serve(request, found[0])


@endpoint(
    summary="Upload a file the run left under outputs/; its ending (finish) names it, and is recorded with it.",
    scope=WORKER, upload=True, answer=File, params=(LEASE,), errors=(409,),
)
async def run_output(request: Request, who: Principal) -> Response:
    run_id, lease = _run(request)
    await request.state.reports.leased(_identity(who), run_id, lease)
    return json_response(await receive(request, _named(request), _content_type(request)))


def routes() -> list[Route]:
    # `{name:path}`: a name holding '/' (sent as %2F) reaches the handler, which says what is wrong.
    return [
        Route("/tasks/{task_id}/artifacts", list_artifacts, methods=["GET"]),
        Route("/tasks/{task_id}/artifacts/{sha256}", download, methods=["GET"]),
        Route("/tasks/{task_id}/artifacts/{name:path}", stage, methods=["PUT"]),
        Route("/worker/runs/{run_id}/artifacts/{sha256}", run_input, methods=["GET"]),
        Route("/worker/runs/{run_id}/artifacts/{name:path}", run_output, methods=["PUT"]),
    ]
