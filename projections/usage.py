"""Usage and cost: what runs spent, priced exactly, and summed.

A run's tokens arrive with its ending (`t.TokenUsage`); the server prices them with the agent's
`config.pricing` (dollars per million tokens, decimal strings) into the ending event's
`t.RunUsage`, whose `costUsd` is exact decimal text. Sums (`Usage`) are kept as decimal text
too and added with `decimal`, never with floats: a cost is never rounded, however many runs add up.
"""

from __future__ import annotations

import decimal
import re
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

import msgspec

from events import types as t
from projections.lifecycle import ACTIVE

EXACT = decimal.Context(prec=100, traps=[decimal.Inexact, decimal.InvalidOperation, decimal.Overflow])
"""Every sum and product of the decimals kept here fits in 100 digits, so nothing is ever rounded
(Inexact would trap: a bug, never a silent rounding)."""
_DECIMAL = re.compile(r"^[0-9]{1,15}(\.[0-9]{1,15})?$")
"""A non-negative plain decimal: at most 15 digits either side of the point."""


class Usage(msgspec.Struct, kw_only=True, rename="camel"):
    """What runs spent, summed: on a task, an agent and the overview."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: str = "0"
    """Over the priced runs, exact."""
    unpriced_runs: int = 0
    """Runs that ran and ended without a cost: their agent named no prices, or reported no usage
    (an agent that cannot, a run cancelled or lost). Runs that never started are not counted."""


class UsageShare(msgspec.Struct, kw_only=True, rename="camel"):
    """An agent's usage over one project's tasks: the unit the read models keep, so an agent's and
    the overview's usage are summed over the projects a caller sees from a few rows."""

    agent_id: str
    project_id: str
    usage: Usage = msgspec.field(default_factory=Usage)


def share_key(agent_id: str, project_id: str) -> str:
    return f"{agent_id} {project_id}"


def text(value: Decimal) -> str:
    """Plain decimal notation without trailing zeros: "0.00015", "12", "0"."""
    return format(value.normalize(EXACT), "f")


def parse(value: Any, name: str) -> Decimal:
    """A decimal string of dollars from a config; ValueError with a sentence if it is not one."""
    if not isinstance(value, str) or not _DECIMAL.match(value):
        shown = repr(value) if isinstance(value, str) else msgspec.json.encode(value).decode()
        negative = isinstance(value, str) and value.startswith("-") or isinstance(value, (int, float)) and value < 0
        why = "must not be negative" if negative else "must be a decimal string"
        raise ValueError(
            f"config.{name} {why}: give dollars as a string of digits with an optional point, such as "
            f'"0.15" (at most 15 digits either side), not {shown}.'
        )
    return Decimal(value)


def check_config(config: dict[str, Any]) -> None:
    """ValueError with a sentence if the config's `pricing` or `budgetUsd` is not what API.md says."""
    pricing = config.get("pricing")
    if pricing is not None:
        if not isinstance(pricing, dict) or set(pricing) != {"promptPerMillion", "completionPerMillion"}:
            raise ValueError(
                'config.pricing must be {"promptPerMillion": "<dollars>", "completionPerMillion": "<dollars>"}, '
                "both decimal strings."
            )
        for key, value in pricing.items():
            parse(value, f"pricing.{key}")
    if config.get("budgetUsd") is not None:
        parse(config["budgetUsd"], "budgetUsd")


def budget(config: dict[str, Any]) -> Decimal | None:
    value = config.get("budgetUsd")
    return None if value is None else Decimal(value)


def priced(tokens: t.TokenUsage, config: dict[str, Any]) -> t.RunUsage:
    """The run's usage with its cost under the agent's prices (dollars per million tokens)."""
    cost = None
    pricing = config.get("pricing")
    if pricing is not None:
        per_million = EXACT.add(
            EXACT.multiply(Decimal(tokens.prompt_tokens), Decimal(pricing["promptPerMillion"])),
            EXACT.multiply(Decimal(tokens.completion_tokens), Decimal(pricing["completionPerMillion"])),
        )
        cost = text(per_million.scaleb(-6, EXACT))
    return t.RunUsage(prompt_tokens=tokens.prompt_tokens, completion_tokens=tokens.completion_tokens, cost_usd=cost)


def cost(tokens: t.TokenUsage, config: dict[str, Any]) -> Decimal | None:
    found = priced(tokens, config).cost_usd
    return None if found is None else Decimal(found)


def one_run(used: t.RunUsage | None) -> Usage:
    """A run's share of a sum (None: it reported no usage)."""
    if used is None:
        return Usage(unpriced_runs=1)
    return Usage(
        prompt_tokens=used.prompt_tokens, completion_tokens=used.completion_tokens,
        cost_usd=used.cost_usd or "0", unpriced_runs=int(used.cost_usd is None),
    )


def add(a: Usage, b: Usage) -> Usage:
    return Usage(
        prompt_tokens=a.prompt_tokens + b.prompt_tokens, completion_tokens=a.completion_tokens + b.completion_tokens,
        cost_usd=text(EXACT.add(Decimal(a.cost_usd), Decimal(b.cost_usd))),
        unpriced_runs=a.unpriced_runs + b.unpriced_runs,
    )


def total(usages: Iterable[Usage]) -> Usage:
    found = Usage()
    for usage in usages:
        found = add(found, usage)
    return found


def ended(status: str, run_id: str | None, data: t.EventData) -> Usage | None:
    """The share of a sum of the event that ends the task's current run, which was running (status
    before the event): its review, completion or failure (with the usage it carries) or its cancel
    (no usage: what it spent is not known). None for any other event, and for the events that end
    a run already ended (the completion or failure that resolves a review) or one never started."""
    if status not in ACTIVE or not isinstance(data, (t.TaskReview, t.TaskCompleted, t.TaskFailed, t.TaskCancelled)):
        return None
    if data.run_id is not None and data.run_id != run_id:
        return None
    used = getattr(data, "usage", msgspec.UNSET)
    return one_run(None if used is msgspec.UNSET else used)


def over_budget(name: str, config: dict[str, Any], spent: str) -> str | None:
    """Why an agent takes no more runs (it has spent its `budgetUsd`), or None."""
    cap = budget(config)
    if cap is None or Decimal(spent) < cap:
        return None
    return f"Agent {name} has spent ${spent} of its budget of ${text(cap)} (config.budgetUsd); it takes no more runs."
