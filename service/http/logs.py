"""Structured logs: JSON lines when not on a terminal, readable lines on one."""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import threading
from contextvars import ContextVar

import msgspec
import structlog

from events.envelope import now_rfc3339

_encoder = msgspec.json.Encoder(enc_hook=repr)  # anything unusual in a log line is written as its repr


client_dropped: ContextVar[bool] = ContextVar("client_dropped", default=False)
"""Set by a response that ended because its client stopped reading (and said so at warning)."""

_INCOMPLETE = "ASGI callable returned without completing response."


class _DroppedClientIsNoServerError(logging.Filter):
    """uvicorn calls any unfinished response an error; one we ended on a client that stopped
    reading has been logged as the warning it is. (uvicorn logs in the request's own task, whose
    context carries the flag.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == _INCOMPLETE and client_dropped.get())


class _TurnLogger:
    """structlog's PrintLogger, except that the lines one turn of the event loop writes leave in
    one write at the end of that turn (one access-log line a request, written and flushed alone,
    was a system call a request). Off the loop, or with no loop running, a line leaves at once.
    A process killed mid-turn loses that turn's lines; the log of events is never at stake."""

    def __init__(self, file) -> None:
        self._file = file
        self._pending = threading.local()  # one loop a thread: each flushes its own lines

    def msg(self, message: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write(message + "\n")
            return
        lines = getattr(self._pending, "lines", None)
        if not lines:
            lines = self._pending.lines = []
            loop.call_soon(self._flush)
        lines.append(message)

    log = debug = info = warn = warning = error = err = critical = exception = fatal = failure = msg

    def _flush(self) -> None:
        lines, self._pending.lines = self._pending.lines, []
        self._write("\n".join(lines) + "\n")

    def _write(self, text: str) -> None:
        self._file.write(text)
        self._file.flush()


def _timestamp(logger, method: str, event: dict) -> dict:
    """structlog's TimeStamper(fmt="iso", utc=True), in the log's own format (the same text), at a
    fraction of its cost: a line is written per request."""
    event["timestamp"] = now_rfc3339()
    return event


def _json_line(event: dict) -> str:
    return _encoder.encode(event).decode()


_access: _TurnLogger | None = None
"""Where access lines go straight as JSON: set by `configure` when lines are JSON at INFO."""
_access_through_structlog = structlog.get_logger("mission_control.access")


def access_line(**fields) -> None:
    """One access-log line. As JSON it is encoded and written here, the line structlog's chain
    would write (the fields, then event, level and timestamp): one is written per request, and
    the chain cost three times the line itself. On a terminal, at a level above INFO, or before
    `configure`, it goes through structlog like any line."""
    if _access is None:
        _access_through_structlog.info("request", **fields)
        return
    fields.update(event="request", level="info", timestamp=now_rfc3339())
    _access.msg(_json_line(fields))


def configure(level: str = "INFO") -> None:
    """Our loggers and the standard library's (uvicorn's, asyncio's) alike: one format, on stderr.
    uvicorn must be run with `log_config=None` so that its records reach the root logger here."""
    renderer = (
        structlog.dev.ConsoleRenderer() if sys.stderr.isatty()
        # msgspec renders a line several times faster than json: one is written per request.
        else structlog.processors.JSONRenderer(serializer=lambda event, **_: _json_line(event))
    )
    shared = [
        structlog.processors.add_log_level,
        _timestamp,
    ]
    lines = _TurnLogger(sys.stderr)
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=functools.partial(lambda logger, *_: logger, lines),
        cache_logger_on_first_use=True,
    )
    global _access
    _access = lines if not sys.stderr.isatty() and logging.getLevelName(level) <= logging.INFO else None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's per-connection chatter stays at warning; its errors still come through, formatted.
    logging.getLogger("uvicorn").setLevel(max(logging.getLevelName(level), logging.WARNING))
    uvicorn_errors = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DroppedClientIsNoServerError) for f in uvicorn_errors.filters):
        uvicorn_errors.addFilter(_DroppedClientIsNoServerError())
    # httpx logs every request's full URL at INFO: webhook URLs and provider paths may hold secrets.
    logging.getLogger("httpx").setLevel(max(logging.getLevelName(level), logging.WARNING))
