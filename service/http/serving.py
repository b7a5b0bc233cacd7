"""The HTTP server `serve` runs: uvicorn on httptools, with the guards uvicorn lacks.

uvicorn bounds neither the header block nor the time a client may take to send it (httptools
buffers an unfinished header line whole), and its `limit_concurrency` answers 503 only once
headers have arrived, so idle sockets still pile up. The protocol below refuses, before any
ASGI code runs: a header block over `max_header_bytes` (431), headers not complete within
`header_timeout_seconds` of the request's first byte or of the connection (408), and a
connection past `max_connections` open at once (503).
"""

from __future__ import annotations

import gc
import socket
from collections.abc import Callable

import httptools
import msgspec
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.settings import Settings


class GuardedHttpProtocol(HttpToolsProtocol):
    """httptools' protocol with the header bound, the header timeout and the connection cap.
    `protocol_for(settings)` makes the subclass that carries a server's limits."""

    max_header_bytes = 64 * 1024
    header_timeout_seconds = 10.0
    max_connections = 1000

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(_CoalescedWrites(transport, self.loop))
        self._awaiting_headers = True  # from the connection, or a request's first byte, to its headers' end
        self._unparsed = 0  # bytes received while awaiting headers: what httptools may be buffering
        self._header_timer = None
        if len(self.connections) > self.max_connections:
            self._refuse(
                503, "too_many_connections",
                f"The server holds its maximum of {self.max_connections} connections; try again shortly.",
                b"retry-after: 1\r\n",
            )
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # uvicorn's own, with the header bound checked where httptools cannot: mid-header.
        if self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        if self._awaiting_headers:
            self._unparsed += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if not self.transport.is_closing():  # else a guard below refused it from a callback
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return
        if self._awaiting_headers and self._unparsed > self.max_header_bytes:
            self._refuse_headers()
        elif self._header_timer is None and not self.transport.is_closing() and (
            self.cycle is not None and self.cycle.response_complete and not self.pipeline
        ):  # bytes between requests that begin none (stray line breaks) get no more time than headers
            self._arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._awaiting_headers = True
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.max_header_bytes:
            self._refuse_headers()
            raise _Refused  # stops the parser: nothing of this request reaches the app
        self._awaiting_headers = False
        self._unparsed = 0
        self._disarm_header_timer()
        super().on_headers_complete()

    def _refuse_headers(self) -> None:
        self._refuse(
            431, "headers_too_large",
            f"The request line and headers are over the limit of {self.max_header_bytes} bytes.",
        )

    def _refuse(self, status: int, code: str, detail: str, extra: bytes = b"") -> None:
        """Answer `status` with the API's error shape, before any ASGI code runs, and close."""
        self._awaiting_headers = False
        self._disarm_header_timer()
        self.logger.warning("Refused a connection from %s with %d: %s", self.client, status, detail)
        body = msgspec.json.encode({"detail": detail, "code": code})
        self.transport.write(b"".join([
            STATUS_LINE[status], b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n", extra, b"\r\n", body,
        ]))
        self.transport.close()

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_seconds, self._headers_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._awaiting_headers:
            self._refuse(
                408, "request_timeout", f"The request's headers did not arrive within {self.header_timeout_seconds:g} s."
            )
        elif self.cycle is None or self.cycle.response_complete:
            self.transport.close()  # only stray bytes since the last answer


class _CoalescedWrites:
    """A transport whose writes within one turn of the event loop leave in one send.

    uvicorn writes a response's status line and headers, then its body, as two sends: two
    segments on the wire and two wake-ups of the client, which on a machine with few cores
    preempts the server mid-response. Joined, an answer is one segment; a streamed body still
    leaves chunk by chunk, each at the end of the turn that wrote it."""

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport, loop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
            self._pending = []
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a refused request."""


def protocol_for(settings: Settings) -> type[GuardedHttpProtocol]:
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), {
        "max_header_bytes": settings.max_header_bytes,
        "header_timeout_seconds": settings.header_timeout_seconds,
        "max_connections": settings.max_connections,
    })


class AddressInUse(Exception):
    """The address `serve` was asked to listen on cannot be had; the message says why."""


def listen(host: str, port: int) -> socket.socket:
    """The bound socket `serve` hands uvicorn, taken before anything is written to the data dir."""
    return _bound(host, port, shared=False)


def listen_shared(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` sockets bound to one address with SO_REUSEPORT, one for each process of `serve
    --processes`: the kernel spreads new connections over those listening by a hash of each
    connection's addresses, so long-lived keep-alive connections spread as evenly as short ones
    (one socket shared by all would go to whichever process accepts first, and asyncio accepts
    all that are waiting at once). A socket kept by the supervisor while its process restarts holds
    the connections waiting on it for the new one. The address is first taken as `listen` takes it,
    so that a port held by anything, another `serve --processes` of the same user included (which
    SO_REUSEPORT alone would let share it), is refused as a busy one."""
    _bound(host, port, shared=False).close()
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sockets.append(_bound(host, port, shared=True))
    except AddressInUse:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _bound(host: str, port: int, shared: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise AddressInUse(f"cannot listen on {url(host, port)}: {exc.strerror or exc}") from None
    return sock


def url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


GC_YOUNGEST_THRESHOLD = 10_000
"""Allocations between collections of the youngest generation (Python's default: 700)."""


def _collect_less() -> None:
    """The cycle collector, tuned for a server once it has started. At Python's default a
    collection ran every few requests and found most of their objects still in flight: it moved
    them to older generations, whose collections then walked every long-lived object. That was
    a sixth of the CPU time of a `POST /tasks` (profiled in process with `gc.callbacks`). Now
    what has lived through startup is frozen out of collections, and the youngest generation is
    collected after 10,000 allocations, by when a request's objects are freed by their counts.
    Garbage in cycles lives a little longer: at most a few MB of it."""
    gc.freeze()
    gc.set_threshold(GC_YOUNGEST_THRESHOLD, *gc.get_threshold()[1:])


def run(app, settings: Settings, sock: socket.socket, on_ready: Callable[[], None]) -> None:
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                _collect_less()
                on_ready()

    config = uvicorn.Config(
        app, http=protocol_for(settings), access_log=False, log_level="warning",
        timeout_graceful_shutdown=3, lifespan="on",
        proxy_headers=False,  # nothing reads the client's address or scheme: no layer to rewrite them
        log_config=None,  # uvicorn's records go through service.http.logs, as JSON when not on a terminal
    )
    Server(config).run(sockets=[sock])
