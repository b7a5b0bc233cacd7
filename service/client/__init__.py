"""A typed client of a running Mission Control: `Client` (sync) and `AsyncClient`, whose models
are the server's own msgspec types. `mission-control task ...` and its siblings are built on it."""

from service.client.http import DEFAULT_SERVER, ApiError, AsyncClient, Call, Client, Tasks, Unreachable
from service.client.watch import ENDINGS, RunWatch

__all__ = ["DEFAULT_SERVER", "ENDINGS", "ApiError", "AsyncClient", "Call", "Client", "RunWatch", "Tasks", "Unreachable"]
