"""Agent kinds: each is one async function `run(ctx) -> result text | None`.

An agent reports output through `ctx.emit`, asks for input with `ctx.ask` (or
`ctx.request_input` when it reads `ctx.messages` itself), and fails by raising `RunFailed`.
The executor (service/work/executor.py) reports all of it; agents never touch the log, and see
only what the run's assignment carries. Which function runs which kind is in
`service.work.agents.kinds`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from events.types import TokenUsage
from service.work.wire import AgentBrief, TaskBrief

RESULT_LIMIT = 64 * 1024
"""A deliverable is kept whole up to this many characters; past that, its tail."""

C = TypeVar("C")


class RunFailed(Exception):
    """`reason` is a `task.failed` kind: error, exit, timeout, interrupted."""

    def __init__(self, reason: str, error: str, exit_code: int | None = None, result: str | None = None):
        super().__init__(error)
        self.reason, self.error, self.exit_code, self.result = reason, error, exit_code, result


class Config(msgspec.Struct, kw_only=True, rename="camel", forbid_unknown_fields=True):
    """Base of an agent kind's `config`: camelCase keys, a misspelt one is an error."""

    pricing: dict[str, str] | None = None
    """Dollars per million tokens; every kind may have them (checked by projections.usage)."""
    budget_usd: str | None = None
    """What the agent's runs may cost in all, in dollars."""


def parse_config(kind: type[C], config: dict[str, Any]) -> C:
    """The agent's config as its kind's type; ValueError with a sentence saying what is wrong.
    Lax about numbers in strings: events hold no fractions, so "0.5" is how a client sends one."""
    try:
        return msgspec.convert(config, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise ValueError(f"Invalid agent config: {exc}.") from None


class RunContext(msgspec.Struct, kw_only=True):
    task: TaskBrief
    task_id: str
    run_id: str
    agent: AgentBrief
    prompt: str
    """Composed on the server: project context, dependencies' deliverables, title, description, content."""
    workdir: Path
    """The run's own working directory (created by the agent that needs it)."""
    emit: Callable[[str, str], Awaitable[None]]
    """emit(stream, text): output as it is produced, in order."""
    request_input: Callable[[str], Awaitable[None]]
    """request_input(prompt): the task waits for input; the answer arrives on `messages`."""
    messages: asyncio.Queue
    """Messages sent to the task while it runs, in order."""
    spent: Callable[[TokenUsage], None]
    """spent(tokens): what the run has spent so far, as its provider or program reports it (each
    report the whole so far, the last the run's). Raises RunFailed once that crosses what is left of
    the agent's budget: the agent then stops."""

    async def ask(self, prompt: str) -> str:
        """Ask for input and wait for the next message."""
        await self.request_input(prompt)
        return await self.messages.get()

    def config(self, kind: type[C]) -> C:
        try:
            return parse_config(kind, self.agent.config)
        except ValueError as exc:
            raise RunFailed("error", f"Agent {self.agent.name}: {exc}") from None


AgentFunction = Callable[[RunContext], Awaitable[str | None]]


class Tail:
    """The last `limit` characters of a text that arrives in pieces, in bounded memory."""

    def __init__(self, limit: int = RESULT_LIMIT):
        self.limit = limit
        self._parts: list[str] = []
        self._size = 0

    def add(self, text: str) -> None:
        self._parts.append(text)
        self._size += len(text)
        if self._size > 2 * self.limit:  # compact now and then, not on every piece
            self._parts = [self.text]
            self._size = len(self._parts[0])

    @property
    def text(self) -> str:
        return "".join(self._parts)[-self.limit :]
