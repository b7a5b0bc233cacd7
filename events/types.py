"""The event types: one msgspec Struct per event name in API.md.

An event's payload is the Struct encoded with camelCase keys; its name lives in the
`event_type` class variable and is stored beside the payload in the envelope, so payloads
carry no type tag of their own. `schema` is the payload's current shape version;
older shapes are turned into the current one by `events.upcast`.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import msgspec

TaskType = Literal["prompt", "command"]
OutputStream = Literal["stdout", "stderr", "text"]
Decision = Literal["approve", "reject"]
FailureKind = Literal[
    "error", "exit", "timeout", "interrupted", "rejected", "lost", "queue_timeout", "dependency_failed",
]
"""`lost`: the run's lease lapsed (its desktop stopped reporting, restarted, or its key was revoked);
`queue_timeout` and `dependency_failed`: a queued run that never started (it waited too long, or a
task it depends on failed or was cancelled)."""
AgentKind = Literal["shell", "exec", "openai", "echo"]
AgentStatus = Literal["active", "paused", "stopped", "error"]
Priority = Annotated[int, msgspec.Meta(ge=1, le=10)]


class EventData(msgspec.Struct, kw_only=True, rename="camel", forbid_unknown_fields=True):
    """Base of every event payload."""

    event_type: ClassVar[str]
    schema: ClassVar[int] = 1


# Tasks


Tokens = Annotated[int, msgspec.Meta(ge=0, le=2**53 - 1)]


class TokenUsage(msgspec.Struct, kw_only=True, rename="camel", forbid_unknown_fields=True):
    """The tokens a run spent, as its agent reported them (the openai kind's final usage chunk, an
    exec agent's `MC-USAGE` line): what a worker's ending carries."""

    prompt_tokens: Tokens
    completion_tokens: Tokens


class RunUsage(TokenUsage, kw_only=True):
    """A run's usage as its ending event records it: priced by the server with the agent's
    `config.pricing` when the run ended, so a rebuild never prices it again."""

    cost_usd: str | None = None
    """An exact decimal string (never a float); None: the agent names no prices."""


class TaskCreated(EventData):
    event_type: ClassVar[str] = "task.created"
    task_id: str
    type: TaskType
    content: str
    project_id: str
    created_by: str
    title: str | None = None
    description: str | None = None
    desktop_id: str | None = None
    agent_id: str | None = None
    requires_approval: bool = False
    priority: Priority = 5
    timeout_seconds: int | None = None
    metadata: dict[str, Any] = {}
    depends_on: list[str] = []
    webhook_url: str | None = None


class TaskUpdated(EventData):
    """Only the fields that changed are present."""

    event_type: ClassVar[str] = "task.updated"
    task_id: str
    title: str | None | msgspec.UnsetType = msgspec.UNSET
    description: str | None | msgspec.UnsetType = msgspec.UNSET
    content: str | msgspec.UnsetType = msgspec.UNSET
    priority: Priority | msgspec.UnsetType = msgspec.UNSET
    metadata: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET
    timeout_seconds: int | None | msgspec.UnsetType = msgspec.UNSET
    desktop_id: str | None | msgspec.UnsetType = msgspec.UNSET
    requires_approval: bool | msgspec.UnsetType = msgspec.UNSET


class TaskArchived(EventData):
    """The tombstone; `archived: false` brings a task back into default listings."""

    event_type: ClassVar[str] = "task.archived"
    task_id: str
    archived: bool = True


class TaskQueued(EventData):
    """The run waits its turn (`"queue": true` on run). Its `task.started`, when a slot frees, carries
    the same `run_id`. Queue order is by `priority` (the task's when queued; a later `task.updated`
    moves it), then by this event's log position."""

    event_type: ClassVar[str] = "task.queued"
    task_id: str
    run_id: str
    agent_id: str
    priority: Priority = 5
    queue_timeout_seconds: int | None = None
    """Fails the run `queue_timeout` once it has waited this long without starting."""


class TaskStarted(EventData):
    """The run is placed on a desktop: its lease starts here. Runs recorded before desktops existed
    read as placed on an unnamed node desktop (`desktop_id` None, epoch 0)."""

    event_type: ClassVar[str] = "task.started"
    task_id: str
    run_id: str
    agent_id: str
    desktop_id: str | None = None
    lease_epoch: int = 0
    """The desktop's epoch (its worker session) the run was placed under: the lease's fence."""


class TaskOutput(EventData):
    event_type: ClassVar[str] = "task.output"
    task_id: str
    run_id: str
    seq: int
    stream: OutputStream
    chunk: str


class TaskInputRequested(EventData):
    event_type: ClassVar[str] = "task.input_requested"
    task_id: str
    run_id: str
    prompt: str = ""


class TaskMessage(EventData):
    event_type: ClassVar[str] = "task.message"
    task_id: str
    run_id: str
    message: str


class TaskReview(EventData):
    """The run finished and its deliverable waits for a person's decision."""

    event_type: ClassVar[str] = "task.review"
    task_id: str
    run_id: str
    result: str | None = None
    usage: RunUsage | msgspec.UnsetType = msgspec.UNSET
    """What the run spent, when its agent reported it (absent otherwise, as before usage was kept)."""


class TaskCompleted(EventData):
    event_type: ClassVar[str] = "task.completed"
    task_id: str
    run_id: str
    result: str | None = None
    usage: RunUsage | msgspec.UnsetType = msgspec.UNSET
    """As on task.review; absent on the completion that approves a review (the review carried it)."""


class TaskFailed(EventData):
    """Schema 2: `reason`, free text in schema 1, is one of FailureKind, so a reader can tell a
    timeout from a rejection without parsing prose (see events/upcasters.py)."""

    event_type: ClassVar[str] = "task.failed"
    schema: ClassVar[int] = 2
    task_id: str
    reason: FailureKind
    error: str
    run_id: str | None = None
    exit_code: int | None = None
    result: str | None = None
    usage: RunUsage | msgspec.UnsetType = msgspec.UNSET
    """As on task.review."""


class TaskCancelled(EventData):
    event_type: ClassVar[str] = "task.cancelled"
    task_id: str
    run_id: str | None = None
    reason: str | None = None


class TaskRetried(EventData):
    event_type: ClassVar[str] = "task.retried"
    task_id: str


# Approvals (recorded in the task's stream, in the same append as the task's own event)


class ApprovalCreated(EventData):
    event_type: ClassVar[str] = "approval.created"
    approval_id: str
    task_id: str
    run_id: str
    artifacts: list[str] = []
    """The SHA-256 of each output artifact of the run: what the approval judges."""


class ApprovalResolved(EventData):
    event_type: ClassVar[str] = "approval.resolved"
    approval_id: str
    task_id: str
    decision: Decision
    feedback: str | None = None
    artifacts: list[str] = []
    """The SHA-256 of the artifacts approved (or rejected): exactly those the approval judged."""


# Presence (its own stream per task, so watching a task never moves the task's version)


class PresenceMarked(EventData):
    event_type: ClassVar[str] = "presence.marked"
    task_id: str
    device_id: str
    ttl_seconds: int = 60


class PresenceCleared(EventData):
    event_type: ClassVar[str] = "presence.cleared"
    task_id: str
    device_id: str


# Agents


class AgentRegistered(EventData):
    event_type: ClassVar[str] = "agent.registered"
    agent_id: str
    name: str
    kind: AgentKind
    config: dict[str, Any] = {}


class AgentUpdated(EventData):
    event_type: ClassVar[str] = "agent.updated"
    agent_id: str
    name: str | msgspec.UnsetType = msgspec.UNSET
    config: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET
    status: AgentStatus | msgspec.UnsetType = msgspec.UNSET


class AgentPaused(EventData):
    event_type: ClassVar[str] = "agent.paused"
    agent_id: str


class AgentResumed(EventData):
    event_type: ClassVar[str] = "agent.resumed"
    agent_id: str


# Projects


class ProjectCreated(EventData):
    event_type: ClassVar[str] = "project.created"
    project_id: str
    name: str
    context: str = ""
    members: list[str] = []


class ProjectUpdated(EventData):
    event_type: ClassVar[str] = "project.updated"
    project_id: str
    name: str | msgspec.UnsetType = msgspec.UNSET
    context: str | msgspec.UnsetType = msgspec.UNSET
    members: list[str] | msgspec.UnsetType = msgspec.UNSET


# API keys: the hash of the secret, never the secret


class ApiKeyIssued(EventData):
    event_type: ClassVar[str] = "apikey.issued"
    key_id: str
    user: str
    scopes: list[str]
    token_hash: str
    project_id: str | None = None
    desktop_id: str | None = None
    """A `worker` key's desktop: the one desktop it may act as."""


class ApiKeyRevoked(EventData):
    event_type: ClassVar[str] = "apikey.revoked"
    key_id: str


# Desktops (stream `desktop-<name>`): a machine running a worker, or a node's own desktop

DesktopOfflineReason = Literal["silent", "left", "revoked", "stopped"]
"""silent: not heard from within a lease; left: its worker said goodbye; revoked: its key was
revoked; stopped: its node shut down."""
DrainedBy = Literal["admin", "worker"]


class DesktopRegistered(EventData):
    """A new worker session: the epoch moves on, and runs placed under an older one are lost."""

    event_type: ClassVar[str] = "desktop.registered"
    desktop_id: str
    session_id: str
    epoch: int
    agents: list[AgentKind]
    capacity: int
    version: str = ""
    hostname: str = ""
    key_id: str | None = None
    """The worker key the session registered with; None for a node's own desktop."""
    node: bool = False
    """A node's own desktop, run in a `serve` process."""


class DesktopOnline(EventData):
    """Heard from again after going offline (the same session), or resumed from a drain."""

    event_type: ClassVar[str] = "desktop.online"
    desktop_id: str
    epoch: int


class DesktopOffline(EventData):
    event_type: ClassVar[str] = "desktop.offline"
    desktop_id: str
    epoch: int
    reason: DesktopOfflineReason


class DesktopDraining(EventData):
    """It takes no new runs and finishes those it has."""

    event_type: ClassVar[str] = "desktop.draining"
    desktop_id: str
    by: DrainedBy


class DesktopRemoved(EventData):
    event_type: ClassVar[str] = "desktop.removed"
    desktop_id: str


# Webhook deliveries: each attempt's outcome is on the record


class WebhookAttempted(EventData):
    event_type: ClassVar[str] = "webhook.attempted"
    delivery_id: str
    task_id: str
    url: str
    attempt: int
    ok: bool
    status_code: int | None = None
    error: str | None = None
    checkpoint: int = 0
    """Every delivery triggered at or before this position had concluded when this attempt was
    recorded: where a restarted delivery worker resumes its fold of the log."""


# The log's own history


class SettingsRecorded(EventData):
    """The settings that shape the contract, as the first node on this log ran with them (stream
    `settings`): every later node must run with the same, or it refuses to start."""

    event_type: ClassVar[str] = "settings.recorded"
    schema: ClassVar[int] = 2
    """Schema 2: the lease in whole milliseconds. Schema 1 held `leaseSeconds` as a float, which
    RFC 8785 writes otherwise than the standard library (30.0 as 30): events hold no floats."""
    max_concurrent: int
    lease_milliseconds: int


class LogRechained(EventData):
    """`import --rechain` carried a log hashed with code-point key order (before RFC 8785) forward:
    the old chain's head, so that an export or digest taken before stays traceable."""

    event_type: ClassVar[str] = "log.rechained"
    previous_head: int
    previous_hash: str
    first_changed: int
    """The first position whose payload or meta was re-encoded; every hash from it on is new."""
    changed: int
    """How many events were re-encoded."""


EVENT_TYPES: dict[str, type[EventData]] = {
    cls.event_type: cls
    for cls in (
        TaskCreated, TaskUpdated, TaskArchived, TaskQueued, TaskStarted, TaskOutput, TaskInputRequested,
        TaskMessage, TaskReview, TaskCompleted, TaskFailed, TaskCancelled, TaskRetried,
        ApprovalCreated, ApprovalResolved, PresenceMarked, PresenceCleared,
        AgentRegistered, AgentUpdated, AgentPaused, AgentResumed,
        ProjectCreated, ProjectUpdated, ApiKeyIssued, ApiKeyRevoked, WebhookAttempted,
        DesktopRegistered, DesktopOnline, DesktopOffline, DesktopDraining, DesktopRemoved,
        SettingsRecorded, LogRechained,
    )
}


# Devices and notifications (stream `devices-<user>`: a user's devices, and what each was told)

DeviceKind = Literal["webhook", "slack", "browser"]
NotifyOn = Literal["task.review", "task.input_requested", "task.failed", "task.completed"]
NOTIFY_ON: tuple[str, ...] = NotifyOn.__args__  # type: ignore[attr-defined]
"""The task events a watcher's devices are told of, in API.md's order."""


class DeviceRegistered(EventData):
    """A device registered, or registered again with other settings (the latest wins)."""

    event_type: ClassVar[str] = "device.registered"
    user_id: str
    device_id: str
    kind: DeviceKind
    url: str | None = None
    events: list[NotifyOn] = msgspec.field(default_factory=lambda: list(NOTIFY_ON))


class DeviceRemoved(EventData):
    event_type: ClassVar[str] = "device.removed"
    user_id: str
    device_id: str


class Cause(msgspec.Struct, kw_only=True, rename="camel", forbid_unknown_fields=True):
    """The task event a notification tells of."""

    type: NotifyOn
    position: int


class NotificationSent(EventData):
    """The device was told: a receiver's 2xx, or, for a browser, this very event (its dashboard shows it)."""

    event_type: ClassVar[str] = "notification.sent"
    delivery_id: str
    device_id: str
    task_id: str
    cause: Cause
    text: str
    """The sentence the device was told."""
    attempt: int = 1
    status_code: int | None = None


class NotificationFailed(EventData):
    """One attempt failed; `final` when no other follows (attempts used up, or the device is gone)."""

    event_type: ClassVar[str] = "notification.failed"
    delivery_id: str
    device_id: str
    task_id: str
    cause: Cause
    error: str
    attempt: int = 1
    status_code: int | None = None
    final: bool = False


EVENT_TYPES.update(
    {cls.event_type: cls for cls in (DeviceRegistered, DeviceRemoved, NotificationSent, NotificationFailed)}
)


# Artifacts (in the task's stream): files a run takes in or leaves behind, recorded by their
# SHA-256 so that the chain covers the bytes; the bytes are kept content-addressed beside the log.

ArtifactDirection = Literal["input", "output"]
Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
ArtifactSize = Annotated[int, msgspec.Meta(ge=1)]


class ArtifactStaged(EventData):
    """A file put for the task's next run (a later one of the same name, before it starts, replaces it)."""

    event_type: ClassVar[str] = "artifact.staged"
    task_id: str
    name: str
    sha256: Sha256
    size: ArtifactSize
    content_type: str


class ArtifactRecorded(EventData):
    """A file that belongs to a run: an input it consumed (in the append of its `task.started`) or
    an output it left (in the append of its ending)."""

    event_type: ClassVar[str] = "artifact.recorded"
    task_id: str
    run_id: str
    name: str
    sha256: Sha256
    size: ArtifactSize
    content_type: str
    direction: ArtifactDirection


EVENT_TYPES.update({cls.event_type: cls for cls in (ArtifactStaged, ArtifactRecorded)})
