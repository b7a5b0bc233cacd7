"""`exec`: runs a configured program for prompt tasks; any CLI agent can be wired in this way.

Config: `argv` (required, the program and its arguments), `env`, `killGraceSeconds`,
`inputMarker` (default "@@mc:input "). The composed prompt goes to the program's stdin,
followed by a newline; each message sent to the task while it runs follows, one per line.
A stdout line that starts with the marker asks for input: the rest of the line is the
question, the task waits (`awaiting_input`) and the answer arrives on stdin as a message.
Marker lines are not output. The deliverable is the program's stdout (its tail, bounded);
a non-zero exit fails the run with the code.

A stderr line `MC-USAGE {"promptTokens": n, "completionTokens": n}` reports what the run has
spent so far (the last such line is the run's usage; the final newline may be missing). It is not
output; a malformed one (not that JSON object of two whole numbers) is kept as output and counts
for nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated

import msgspec

from events.types import TokenUsage
from service.work.agents import RunContext
from service.work.agents.process import Output, ProcessConfig, finished, run_process

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class ExecConfig(ProcessConfig, kw_only=True):
    argv: Annotated[list[NonEmpty], msgspec.Meta(min_length=1)]
    input_marker: NonEmpty = "@@mc:input "


USAGE_MARKER = "MC-USAGE "


class InputLines:
    """Splits the marker lines out of a stream, passing everything else through as soon as it
    cannot be the start of a marker line (so a prompt without a newline shows). `ask` gets the rest
    of each marker line; with `last_line_ends`, an unfinished marker line at the end counts too."""

    def __init__(
        self, marker: str, output: Callable[[str], Awaitable[None]], ask: Callable[[str], Awaitable[None]],
        last_line_ends: bool = False,
    ):
        self.marker, self.output, self.ask, self.last_line_ends = marker, output, ask, last_line_ends
        self.held = ""
        """The start of a line that is (so far) the marker or a prefix of it."""
        self.at_line_start = True

    async def feed(self, text: str) -> None:
        passed: list[str] = []
        i = 0
        while i < len(text):
            if len(self.held) >= len(self.marker):  # inside a marker line: up to its newline
                end = text.find("\n", i)
                if end < 0:
                    self.held += text[i:]
                    break
                question, self.held, i = (self.held + text[i:end])[len(self.marker) :], "", end + 1
                await self._pass(passed)
                await self.ask(question.removesuffix("\r"))
                continue
            if self.at_line_start:
                candidate = self.held + text[i : i + len(self.marker) - len(self.held)]
                if self.marker.startswith(candidate):
                    self.held, i = candidate, i + len(candidate) - len(self.held)
                    continue
                passed.append(self.held)  # not a marker line after all
                self.held, self.at_line_start = "", False
            end = text.find("\n", i)
            if end < 0:
                passed.append(text[i:])
                break
            passed.append(text[i : end + 1])
            i, self.at_line_start = end + 1, True
        await self._pass(passed)

    async def close(self) -> None:
        """At the end of the stream an unfinished marker line is plain output (unless `last_line_ends`)."""
        held, self.held = self.held, ""
        if self.last_line_ends and len(held) >= len(self.marker):
            await self.ask(held[len(self.marker):].removesuffix("\r"))
        else:
            await self._pass([held])

    async def _pass(self, passed: list[str]) -> None:
        if text := "".join(passed):
            passed.clear()
            await self.output(text)


async def run(ctx: RunContext) -> str | None:
    config = ctx.config(ExecConfig)
    output = Output(ctx)
    lines = InputLines(config.input_marker, output.stdout, ctx.request_input)

    async def spent(line: str) -> None:
        try:
            tokens = msgspec.json.decode(line, type=TokenUsage)
        except msgspec.DecodeError:  # ValidationError included
            await output.stderr(f"{USAGE_MARKER}{line}\n")
            return
        ctx.spent(tokens)

    usage_lines = InputLines(USAGE_MARKER, output.stderr, spent, last_line_ends=True)

    async def feed(stdin: asyncio.StreamWriter) -> None:
        stdin.write(ctx.prompt.encode() + b"\n")
        await stdin.drain()
        while True:
            stdin.write((await ctx.messages.get()).encode() + b"\n")
            await stdin.drain()

    code = await run_process(ctx, config.argv, config, lines.feed, usage_lines.feed, feed)
    await lines.close()
    await usage_lines.close()
    return finished(code, output.tail.text)
