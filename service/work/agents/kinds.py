"""The agent kinds of API.md: the function that runs each, and the config it takes. What each
kind may do (its task types, whether it needs an admin, whether it runs programs) is
projections.agents.AGENT_KINDS."""

from __future__ import annotations

from typing import Any, NamedTuple

from events.types import AgentKind
from projections import usage
from service.work.agents import AgentFunction, parse_config
from service.work.agents import echo, shell
from service.work.agents import exec as exec_agent
from service.work.agents import openai as openai_agent


class Kind(NamedTuple):
    run: AgentFunction
    config: type | None
    """The msgspec type of its `config`; None: any config (the built-in echo ignores it)."""


KINDS: dict[AgentKind, Kind] = {
    "echo": Kind(echo.run, None),
    "shell": Kind(shell.run, shell.ShellConfig),
    "exec": Kind(exec_agent.run, exec_agent.ExecConfig),
    "openai": Kind(openai_agent.run, openai_agent.OpenAIConfig),
}


def check_config(kind: str, config: dict[str, Any]) -> None:
    """ValueError with a sentence if `config` does not suit an agent of `kind` (its prices and budget
    included, which any kind may have)."""
    usage.check_config(config)
    schema = KINDS[kind].config
    if schema is not None:
        parse_config(schema, config)
