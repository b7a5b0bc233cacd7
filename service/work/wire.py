"""The worker protocol's messages: what a desktop's worker and the server say to each other.

Declared once: the HTTP routes (service/api/worker.py) decode and encode these, `/openapi.json`
documents them, the remote worker (service/work/worker.py) speaks them, and the node's own
desktop (service/work/local.py) passes them to the same handlers without HTTP.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from events import types as t
from projections.artifacts import File

DesktopName = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
"""1 to 63 of a-z, 0-9, '.', '_' and '-', starting with a letter or a digit."""
Seq = Annotated[int, msgspec.Meta(ge=1)]


class Message(msgspec.Struct, kw_only=True, rename="camel", forbid_unknown_fields=True):
    pass


class Register(Message, kw_only=True):
    """A worker (re)introduces its desktop."""

    session_id: str
    """Picked once per worker process: the same after a dropped connection, new after a restart."""
    desktop_id: DesktopName | None = None
    """The worker's `--desktop`; it must be the key's own."""
    agents: list[t.AgentKind]
    """The kinds the desktop's owner allows it to run."""
    capacity: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1
    version: str = ""
    hostname: str = ""


class Registered(Message, kw_only=True):
    desktop: dict[str, Any]
    """The desktop as `GET /desktops/{id}` shows it."""
    epoch: int
    """Send it with every poll; a poll under an older epoch is told to register again."""
    lease_seconds: float
    poll_seconds: float
    """The longest the server holds a poll open before answering it empty."""
    chunk_bytes: int
    """The most UTF-8 bytes one output chunk may carry."""
    flush_milliseconds: int
    """How long a worker may hold output before sending it."""
    max_batch_chunks: int


class HeldRun(Message, kw_only=True):
    run_id: str
    lease: str
    """The lease token the run was handed out with."""
    messages_seen: int = 0
    """How many of the run's messages the worker has already been given."""


class Poll(Message, kw_only=True):
    """A worker checks in: it is alive, renews the leases of the runs it lists, and asks for work."""

    epoch: int
    free: Annotated[int, msgspec.Meta(ge=0)]
    """How many more runs it would take now."""
    runs: list[HeldRun] = []


class TaskBrief(Message, kw_only=True):
    type: t.TaskType
    content: str
    title: str | None = None
    description: str | None = None
    metadata: dict[str, Any] = {}
    timeout_seconds: int | None = None


class AgentBrief(Message, kw_only=True):
    id: str
    name: str
    kind: t.AgentKind
    config: dict[str, Any] = {}


class Assignment(Message, kw_only=True):
    """A run placed on the desktop, with everything the worker needs to carry it out."""

    run_id: str
    lease: str
    """`<runId>:<epoch>`: send it as the `MC-Lease` header on every report about this run."""
    task_id: str
    number: int
    """The run's number among the task's runs, 1 first."""
    task: TaskBrief
    agent: AgentBrief
    prompt: str
    """Composed on the server: project context, dependencies' deliverables, title, description, content."""
    timeout_seconds: int
    """The effective timeout: the task's, or the server's default."""
    lease_seconds: float
    inputs: list[File] = []
    """The files the run finds under `inputs/` in its working directory: fetch each from
    `GET /worker/runs/{runId}/artifacts/{sha256}`."""
    budget_left_usd: str | None = None
    """What is left of the agent's `config.budgetUsd` as the run is handed out (None: no budget): a run
    whose usage, priced with `agent.config.pricing`, costs more is stopped and fails."""


EndedReason = Literal["cancelled", "lost", "superseded", "revoked", "finished"]


class Ended(Message, kw_only=True):
    """A listed run that is no longer the worker's to run; `finished`: its ending is recorded already."""

    run_id: str
    reason: EndedReason


class Delivered(Message, kw_only=True):
    run_id: str
    index: int
    """1-based, in order, over the run's messages."""
    message: str


class PollAnswer(Message, kw_only=True):
    assignments: list[Assignment] = []
    ended: list[Ended] = []
    messages: list[Delivered] = []
    drain: bool = False
    """The desktop is draining: take nothing new."""


class Chunk(Message, kw_only=True):
    seq: Seq
    """Counting from 1 per run, without gaps."""
    stream: t.OutputStream
    chunk: str


class OutputBatch(Message, kw_only=True):
    chunks: list[Chunk]


class OutputAck(Message, kw_only=True):
    acked_seq: int
    """Every chunk up to this seq is recorded; the worker may forget them."""


class Ask(Message, kw_only=True):
    """The agent asks a question and waits for a message."""

    number: Seq
    """The run's questions counted from 1: a resend of the same number records nothing."""
    prompt: str = ""
    after_seq: int = 0
    """The last output seq written before the question."""


class Ending(Message, kw_only=True):
    """How a run ended, with the output not yet acknowledged."""

    outcome: Literal["done", "failed"]
    result: str | None = None
    reason: Literal["error", "exit", "timeout", "interrupted"] | None = None
    error: str | None = None
    exit_code: int | None = None
    last_seq: int = 0
    """The run's last output seq once `output` is applied: no ending is recorded with output missing."""
    output: list[Chunk] = []
    usage: t.TokenUsage | None = None
    """The tokens the run spent, if its agent reported them; the server prices them."""
    artifacts: list[dict[str, Any]] = []
    """The files the run left under `outputs/`, each uploaded first (`PUT /worker/runs/{runId}/artifacts/{name}`):
    `{name, sha256, size, contentType}` as the upload answered. Recorded with the ending; one never
    uploaded refuses it (409 `artifact_missing`)."""


class RunStatus(Message, kw_only=True):
    status: str
    """The task's status after the report."""


class Gap(Message, kw_only=True):
    """409 `output_gap`: resend from `expectedSeq`."""

    detail: str
    code: Literal["output_gap"] = "output_gap"
    expected_seq: int


def lease_token(run_id: str, epoch: int) -> str:
    return f"{run_id}:{epoch}"


def parse_lease(token: str) -> tuple[str, int] | None:
    """(run id, epoch) of a lease token, or None if it is not one."""
    run_id, sep, epoch = token.rpartition(":")
    return (run_id, int(epoch)) if sep and run_id and epoch.isascii() and epoch.isdigit() else None
