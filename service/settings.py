"""Settings: every one has a default, an environment variable and (for the CLI) an option."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from service import outbound


class Settings(msgspec.Struct, kw_only=True):
    data_dir: str = "./var"
    host: str = "127.0.0.1"
    port: int = 8000
    max_concurrent: int = 5
    """Runs that may be `running` or `awaiting_input` at once, across all tasks."""
    max_body_bytes: int = 1024 * 1024
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

    def __post_init__(self) -> None:
        outbound.allowed(self.webhook_allow)  # a ValueError that says which item is wrong

    @property
    def database(self) -> Path:
        return Path(self.data_dir) / "mission-control.db"


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
    except msgspec.ValidationError as exc:  # e.g. MC_METRICS_PUBLIC=yes: one clear line, not a traceback
        raise SystemExit(f"mission-control: a setting is invalid: {exc} (booleans are true/false or 1/0)") from None
