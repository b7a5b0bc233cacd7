"""`shell`: runs a command task's content with /bin/sh -c.

Config (all optional): `allowedUsers` (who besides admins may run on it), `env` (names of
server environment variables to pass through) and `killGraceSeconds`. stdout and stderr stream as they are; exit 0 finishes the run with the
tail of stdout as its deliverable, anything else fails it with the exit code.
"""

from __future__ import annotations

from service.work.agents import RunContext
from service.work.agents.process import Output, ProcessConfig, finished, run_process


class ShellConfig(ProcessConfig):
    pass


async def run(ctx: RunContext) -> str | None:
    config = ctx.config(ShellConfig)
    output = Output(ctx)
    code = await run_process(ctx, ["/bin/sh", "-c", ctx.task.content], config, output.stdout, output.stderr)
    return finished(code, output.tail.text)
