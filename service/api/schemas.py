"""Request and response bodies of the HTTP API: declared once, they validate what comes in,
encode what goes out, and generate the OpenAPI document."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from events import types as t
from projections.approvals import ApprovalStatus
from projections.desktops import DesktopStatus
from projections.lifecycle import Status
from projections.usage import Usage

NonEmpty = Annotated[str, Meta(min_length=1)]
Url = Annotated[str, Meta(pattern=r"^https?://[^\s]+$", max_length=2048)]
Timeout = Annotated[int, Meta(ge=1, le=7 * 24 * 3600)]
Label = Annotated[str, Meta(min_length=1, max_length=200)]


def sent_fields(body: Struct) -> dict[str, Any]:
    """The fields a change body sets: those the client sent (unsent ones are UNSET)."""
    return {f: getattr(body, f) for f in body.__struct_fields__ if getattr(body, f) is not UNSET}


class Body(Struct, kw_only=True, rename="camel", forbid_unknown_fields=True):
    pass


class CreateTask(Body):
    type: t.TaskType
    content: NonEmpty
    title: str | None = None
    description: str | None = None
    desktop_id: Label | None = None
    agent_id: uuid.UUID | None = None
    project_id: uuid.UUID | None = None
    requires_approval: bool | None = None
    priority: t.Priority = 5
    timeout_seconds: Timeout | None = None
    metadata: dict[str, Any] = {}
    depends_on: Annotated[list[uuid.UUID], Meta(extra_json_schema={"uniqueItems": True})] = []
    webhook_url: Url | None = None

    def __post_init__(self) -> None:
        # Refused, not deduplicated: a list that names a task twice is a mistake the client should see.
        if len(set(self.depends_on)) != len(self.depends_on):
            seen: set[uuid.UUID] = set()
            twice = next(d for d in self.depends_on if d in seen or seen.add(d))
            raise ValueError(f"dependsOn names task {twice} more than once")


class UpdateTask(Body):
    title: str | None | UnsetType = UNSET
    description: str | None | UnsetType = UNSET
    content: NonEmpty | UnsetType = UNSET
    priority: t.Priority | UnsetType = UNSET
    metadata: dict[str, Any] | UnsetType = UNSET
    timeout_seconds: Timeout | None | UnsetType = UNSET
    desktop_id: Label | None | UnsetType = UNSET
    requires_approval: bool | UnsetType = UNSET
    archived: bool | UnsetType = UNSET


class RunTask(Body):
    agent_id: uuid.UUID | None = None
    agent_id_snake: uuid.UUID | None = msgspec.field(default=None, name="agent_id")
    queue: bool = False
    """Wait in the queue (202, `queued`) rather than be refused at the limit, for a desktop, or for a dependency."""
    queue_timeout_seconds: Timeout | None = None
    """With `queue`: fail the run `queue_timeout` if it has not started this long after it was queued."""

    def __post_init__(self) -> None:
        if self.queue_timeout_seconds is not None and not self.queue:
            raise ValueError("queueTimeoutSeconds is for a run that queues; send \"queue\": true with it")


class CancelTask(Body):
    reason: Annotated[str, Meta(max_length=2000)] | None = None


class SendMessage(Body):
    message: NonEmpty


class ReviewBody(Body):
    decision: t.Decision
    feedback: Annotated[str, Meta(max_length=20000)] | None = None


class PresenceBody(Body):
    device_id: Label


class RegisterDevice(Body):
    device_id: Label
    kind: t.DeviceKind
    url: Url | None = None
    """Where a `webhook` or `slack` device is told; a `browser` one has none."""
    events: Annotated[list[t.NotifyOn], Meta(min_length=1, extra_json_schema={"uniqueItems": True})] | None = None
    """The task events it is told of (default: all of them)."""

    def __post_init__(self) -> None:
        if self.kind == "browser" and self.url is not None:
            raise ValueError("a browser device has no url: it is told on the activity stream")
        if self.kind != "browser" and self.url is None:
            raise ValueError(f"a {self.kind} device needs the url it is told at")
        if self.events is not None and len(set(self.events)) != len(self.events):
            raise ValueError("events names an event more than once")


class CreateAgent(Body):
    name: Label
    kind: t.AgentKind
    config: dict[str, Any] = {}


class UpdateAgent(Body):
    name: Label | UnsetType = UNSET
    config: dict[str, Any] | UnsetType = UNSET
    status: t.AgentStatus | UnsetType = UNSET


class CreateProject(Body):
    name: Label
    context: str = ""
    members: list[Label] = []


class UpdateProject(Body):
    name: Label | UnsetType = UNSET
    context: str | UnsetType = UNSET
    members: list[Label] | UnsetType = UNSET


# Responses


class TaskSummary(Struct, kw_only=True, rename="camel"):
    id: str
    type: t.TaskType
    content: str
    desktop_id: str | None
    title: str | None


class ApprovalOut(Struct, kw_only=True, rename="camel"):
    id: str
    task_id: str
    status: ApprovalStatus
    created_at: str
    resolved_at: str | None
    resolved_by: str | None
    feedback: str | None
    artifacts: list[str] = []
    """The SHA-256 of each output artifact of the run it was opened for: resolving it approves exactly those."""
    task: TaskSummary | None


class DesktopOut(Struct, kw_only=True, rename="camel"):
    """A desktop: a machine that runs a worker, or a node's own."""

    id: str
    """Its name."""
    status: DesktopStatus
    agents: list[t.AgentKind]
    """The agent kinds it hosts, as its worker's owner allows them."""
    capacity: int
    """How many runs it takes at once."""
    busy: int
    """How many runs it has now: every active run placed on it."""
    running: list[str]
    """The run ids of those of its runs the caller may see."""
    last_seen_at: str
    """When its worker was last heard from; until this node has heard from it, when the desktop last changed."""
    version: str
    """Its worker's version."""


class DesktopAnswer(Struct):
    desktop: DesktopOut


class Memory(Struct):
    used: int
    total: int
    percent: float


class Resources(Struct):
    cpu: float
    memory: Memory


class LogFigures(Struct):
    head: int
    streams: int


class Overview(Struct, kw_only=True, rename="camel"):
    tasks: dict[Status, int]
    active_desktops: int
    active_agents: int
    approvals_pending: int
    max_concurrent: int
    resources: Resources
    log: LogFigures
    usage: Usage
    """Summed over the runs of the tasks in the caller's projects."""


class Me(Struct, kw_only=True, rename="camel"):
    """Who the key is and what it may do: the dashboard shows each user only what their key allows."""

    user: str
    scopes: list[str]
    """The key's scopes as issued, sorted; `admin` implies every other."""
    project_id: str | None
    """The one project a key issued with `--project` acts within; null for a key of no single project."""


class EventsPage(Struct):
    events: list[Any]
    next: int
    head: int


class Digest(Struct):
    position: int
    hash: str


# The few answers that handlers build as plain dicts.


class Health(msgspec.Struct):
    status: Literal["ok"]


class Readiness(msgspec.Struct):
    ready: bool
    head: int
    projected: int
    """The log position the read models have folded up to."""
    detail: str | None = None
    """Why not ready, when the database cannot be reached (head and projected as last read)."""


class Accepted(msgspec.Struct, rename="camel"):
    accepted: bool
    task_id: str
