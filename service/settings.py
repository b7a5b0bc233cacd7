"""Settings: every one has a default, an environment variable and (for the CLI) an option."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

import msgspec

from service.work import outbound
Positive = Annotated[int, msgspec.Meta(ge=1)]


class Settings(msgspec.Struct, kw_only=True):
    data_dir: str = "./var"
    database_url: str = ""
    """The log's database (`--database`, MC_DATABASE_URL): `postgresql://user@host:port/db`;
    empty, the embedded SQLite file in the data dir."""
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 8000
    processes: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    """`serve` processes on the one port, each a node of the same log (`serve --processes N`)."""
    max_header_bytes: Positive = 64 * 1024
    """The request line and headers together; a larger block is answered 431 and closed."""
    header_timeout_seconds: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    """A connection whose request headers have not all arrived this long after its first byte
    (or after it opened) is answered 408 and closed."""
    max_connections: Positive = 1000
    """HTTP connections open at once (streams included); one more is answered 503 and closed."""
    max_concurrent: int = 5
    """Runs that may be `running` or `awaiting_input` at once, across all tasks."""
    max_body_bytes: int = 1024 * 1024
    """A JSON request body."""
    max_artifact_bytes: Positive = 100 * 1024 * 1024
    """An artifact's upload (`PUT /tasks/{id}/artifacts/{name}`, and a worker's of a run's outputs)."""
    max_json_depth: int = 32
    max_string_length: int = 256 * 1024
    require_approval: bool = False
    """The default of a new task's `requiresApproval`."""
    default_timeout_seconds: int = 3600
    metrics_public: bool = False
    heartbeat_seconds: float = 10.0
    """Comment heartbeats on the activity stream; API.md asks for one at least every 15 s."""
    send_timeout_seconds: float = 30.0
    """A stream client that takes no data for this long is dropped."""
    rate_limit_per_second: float = 200.0
    rate_limit_burst: int = 400
    webhook_secret: str = ""
    webhook_attempts: int = 8
    """Attempts at one webhook delivery (the first and its retries) before it is given up."""
    webhook_backoff_seconds: float = 5.0
    """The wait before a delivery's first retry; each further retry waits twice as long."""
    webhook_allow: str = ""
    """Host names and CIDRs (comma-separated) that webhooks may reach though they are loopback or
    private. Link-local and cloud-metadata addresses stay refused whatever this says."""
    durable: bool = True
    lease_seconds: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    """How long a run's lease lasts unless its worker renews it; a desktop not heard from for this
    long goes offline."""
    local_desktop: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")] = "local"
    """The name of this node's own desktop."""
    no_local_desktop: bool = False
    """Run nothing in this process: every run goes to a worker."""

    def __post_init__(self) -> None:
        outbound.allowed(self.webhook_allow)  # a ValueError that says which item is wrong
        if self.database_url and not self.database_url.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"the database URL {self.database_url!r} is not postgresql://user@host:port/db")

    @property
    def database(self) -> Path:
        """The embedded SQLite file (when no database_url is set)."""
        return Path(self.data_dir) / "mission-control.db"

    @property
    def log_url(self) -> str:
        """What `events.open_log` opens: the database URL, or the SQLite file."""
        return self.database_url or str(self.database)

    @property
    def log_name(self) -> str:
        """The log as messages name it: the database URL without its password, or the file."""
        if not self.database_url:
            return str(self.database)
        return re.sub(r"(://[^/@:]*):[^/@]*@", r"\1@", self.database_url)


def env_name(field: str) -> str:
    return "MC_" + field.upper()


def from_env(**overrides) -> Settings:
    """Defaults, then MC_* environment variables, then explicit overrides (CLI options)."""
    values: dict = {}
    for field in Settings.__struct_fields__:
        raw = os.environ.get(env_name(field))
        if raw is not None:
            values[field] = raw
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return msgspec.convert(values, Settings, strict=False)
    except msgspec.ValidationError as exc:  # e.g. MC_PORT=99999: one clear line, not a traceback (nor a wrap)
        raise SystemExit(f"mission-control: {invalid_setting(exc, values)}") from None


def invalid_setting(exc: msgspec.ValidationError, values: dict) -> str:
    """'Expected `int` <= 65535 - at `$.port`' as a sentence that names the setting and the value."""
    message, _, field = str(exc).rpartition(" - at `$.")
    field = field.rstrip("`")
    if field not in Settings.__struct_fields__:
        return f"a setting is invalid: {exc}."
    hint = " (booleans are true/false or 1/0)" if isinstance(getattr(Settings(), field), bool) else ""
    return (f"the setting {field} ({env_name(field)}) is invalid: {values[field]!r} is not allowed, "
            f"{message[0].lower()}{message[1:]}{hint}.")
