"""The built-in, deterministic agent: it writes its prompt back, for demos and tests.

A task's `metadata.echo` steers it: `delayMs` (the run's length), `chunks` (how many
output events), `fail` (fail with this error), `ask` (ask this question first and echo
the answer), `usage` (`{"promptTokens": n, "completionTokens": n}`: report that the run spent
these, as a provider's last chunk would; anything else there is ignored).
"""

from __future__ import annotations

import asyncio
import contextlib

import msgspec

from events.types import TokenUsage

from service.work.agents import RunContext, RunFailed


async def run(ctx: RunContext) -> str | None:
    options = ctx.task.metadata.get("echo") or {}
    if not isinstance(options, dict):
        options = {}
    text = ctx.prompt
    if isinstance(options.get("ask"), str):
        answer = await ctx.ask(options["ask"])
        text = f"{text}\n{answer}"
    chunks = max(1, min(int(options.get("chunks", 3) or 3), 1000))
    delay = max(0, int(options.get("delayMs", 0) or 0)) / 1000
    size = max(1, -(-len(text) // chunks))
    for start in range(0, len(text), size):
        await asyncio.sleep(delay / chunks)
        await ctx.emit("text", text[start : start + size])
    with contextlib.suppress(msgspec.ValidationError):
        ctx.spent(msgspec.convert(options.get("usage"), TokenUsage))
    if isinstance(options.get("fail"), str):
        raise RunFailed("error", options["fail"])
    return text
