"""/devices: where the caller is told that a task needs them. Every route acts on the caller's
own devices only; a device id is unique per user."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from events import streams
from events import types as t
from projections.devices import Device
from service.api import schemas
from service.commands.deciders import Refused
from service.commands.requests import meta
from service.http.auth import Principal
from service.http.errors import bad_request, json_response
from service.http.endpoints import declared_body, endpoint
from service.work import outbound


async def own_device(request: Request, who: Principal, device_id: str) -> Device:
    """The caller's device, or 404: another user's device of that id is not theirs to name."""
    found = next((d for d in await request.state.models.devices(who.user) if d.device_id == device_id), None)
    if found is None:
        raise Refused("not_found", f"Device {device_id[:200]!r} is not one of yours: register it with POST /devices first.")
    return found


@endpoint(summary="The caller's devices, in the order they were registered.", scope="task:read", answer=list[Device])
async def list_devices(request: Request, who: Principal) -> Response:
    return json_response(await request.state.models.devices(who.user))


@endpoint(
    summary="Register a device (201), or register it again with other settings (200).", scope="task:read",
    body=schemas.RegisterDevice, status=201, same_answer=(200,), answer=Device,
)
async def register_device(request: Request, who: Principal) -> Response:
    _, body = await declared_body(request)
    if body.url is not None:
        try:
            outbound.check_url(body.url, outbound.allowed(request.app.state.settings.webhook_allow))
        except outbound.Refused as refused:
            raise bad_request(f"url {refused}.") from None
    event = t.DeviceRegistered(
        user_id=who.user, device_id=body.device_id, kind=body.kind, url=body.url,
        events=body.events if body.events is not None else list(t.NOTIFY_ON),
    )
    mine = await request.state.models.devices(who.user)
    earlier = next((d for d in mine if d.device_id == body.device_id), None)
    if earlier is not None and (earlier.kind, earlier.url, earlier.events) == (event.kind, event.url, event.events):
        return json_response(earlier, 200)  # registered as it is: nothing to record (each tab does this at load)
    await request.state.commands.append(streams.devices(who.user), [event], None, meta(request, who))
    return json_response(await own_device(request, who, body.device_id), 201 if earlier is None else 200)


@endpoint(
    summary="Remove one of the caller's devices: it is told nothing more.", scope="task:read", status=204,
    body=schemas.Body, body_required=False,
)
async def remove_device(request: Request, who: Principal) -> Response:
    await declared_body(request)  # none, or `{}`: never ignored garbage
    device_id = request.path_params["device_id"]
    if len(device_id) > 200:
        raise bad_request("A device id is 1 to 200 characters.")
    device = await own_device(request, who, device_id)
    await request.state.commands.append(
        streams.devices(who.user), [t.DeviceRemoved(user_id=who.user, device_id=device.device_id)], None,
        meta(request, who),
    )
    return Response(status_code=204)


def routes() -> list[Route]:
    return [
        Route("/devices", list_devices, methods=["GET"]),
        Route("/devices", register_device, methods=["POST"]),
        Route("/devices/{device_id}", remove_device, methods=["DELETE"]),
    ]
