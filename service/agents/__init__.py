"""Agent kinds: each is one async function `run(ctx) -> result text | None`.

An agent reports output through `ctx.emit`, asks for input with `ctx.ask`, and fails
by raising `RunFailed`. The runner records all of it; agents never touch the log.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from projections.agents import Agent
from projections.tasks import Task


class RunFailed(Exception):
    def __init__(self, reason: str, error: str, exit_code: int | None = None, result: str | None = None):
        super().__init__(error)
        self.reason, self.error, self.exit_code, self.result = reason, error, exit_code, result


class RunContext(msgspec.Struct, kw_only=True):
    task: Task
    run_id: str
    agent: Agent
    prompt: str
    workdir: Path
    emit: Callable[[str, str], Awaitable[None]]
    """emit(stream, text): output as it is produced, in order."""
    ask: Callable[[str], Awaitable[str]]
    """ask(prompt): the task waits for input; returns the next message."""
    messages: asyncio.Queue
    """Messages sent to the task while it runs, in order."""

    @property
    def options(self) -> dict[str, Any]:
        return self.agent.config


AgentFunction = Callable[[RunContext], Awaitable[str | None]]
