"""Pure deciders: `decide(state, command) -> events`, or `Refused` saying why not.

Each reads the state folded by `projections` (the same `evolve` that builds the read
models), and what each status admits from the state machine's table (projections/lifecycle.py),
so the task's state machine exists in one place. No I/O here: everything a decision depends on
(the agent, the running count, the dependencies, the desktops) is in the command.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from events import parse_rfc3339
from events import types as t
from projections import lifecycle, usage
from projections.agents import AGENT_KINDS, Agent
from projections.approvals import Approval
from projections.artifacts import File
from projections.desktops import Placement
from projections.tasks import TaskState


Code = Literal[
    "not_found", "agent_not_found", "already_exists", "forbidden", "invalid_status", "agent_mismatch",
    "dependency_not_done", "concurrency_limit", "agent_unavailable", "precondition_failed",
    "conflict", "idempotency_conflict", "desktop_unavailable", "desktop_full", "lease_lost", "output_gap",
    "not_registered", "budget_exceeded", "artifact_missing",
]
"""Why a command was refused. The HTTP layer maps each to a status (service/http/bodies.py)."""


class Refused(Exception):
    """A command that cannot be carried out: a word saying why, and a sentence. `retry_after`:
    the seconds after which the same command may succeed, when waiting is what it needs."""

    def __init__(self, code: Code, detail: str, retry_after: int | None = None):
        super().__init__(detail)
        self.code, self.detail, self.retry_after = code, detail, retry_after


class RunOver(Refused):
    """A report on a run whose lease is lost: the run is over (cancelled, ended), placed on another
    desktop, or superseded (another run, a newer worker session). Nothing is recorded; the reporter
    stops the run."""

    def __init__(self, detail: str):
        super().__init__("lease_lost", detail)


class OutputGap(Refused):
    """A report that would leave a hole in the run's output: nothing is recorded, and the reporter
    resends from `expected_seq`."""

    def __init__(self, expected_seq: int, detail: str):
        super().__init__("output_gap", detail)
        self.expected_seq = expected_seq


def _admitted(task: TaskState, command: lifecycle.Command, action: str) -> None:
    """Refuses `command` unless the task's status admits it; `action` is how a sentence names it."""
    if not lifecycle.admits(task.status, command):
        allowed = lifecycle.either(lifecycle.admitting(command))
        raise Refused("invalid_status", f"Cannot {action} a task that is {task.status}; it must be {allowed}.")


# --- commands --------------------------------------------------------------


class Command(msgspec.Struct, kw_only=True):
    pass


class CreateTask(Command):
    event: t.TaskCreated


class UpdateTask(Command):
    changes: dict[str, Any]
    """Field name (snake_case) to new value; only the fields the client sent."""


class ArchiveTask(Command):
    archived: bool = True


class Fence(msgspec.Struct, kw_only=True):
    """Who reports on a run: the desktop and the epoch of the lease it holds. A report is accepted
    only from the run's own desktop under the epoch it was placed with."""

    desktop_id: str | None
    epoch: int


class StartRun(Command):
    run_id: str
    agent: Agent | None
    agent_id: str
    actor: str
    actor_is_admin: bool
    running: int
    limit: int
    dependencies: dict[str, str | None]
    """Each dependsOn task id to its status (None if it does not exist)."""
    desktops: list[Placement] = []
    """Every desktop that is not removed, with how many runs it has."""
    queue: bool = False
    """Wait in the queue (`task.queued`) instead of a refusal that waiting would cure: the limit
    reached, the desktop full or not online, a dependency not done yet."""
    queue_timeout_seconds: int | None = None
    spent_usd: str = "0"
    """What the agent's runs have cost so far (every project's), against its `config.budgetUsd`."""


class DispatchRun(Command):
    """The dispatcher's turn at a queued run: start it if it can start now, fail it if it waited
    past its deadline or a dependency failed, or leave it queued (nothing recorded)."""

    agent: Agent | None
    running: int
    limit: int
    dependencies: dict[str, str | None]
    desktops: list[Placement]
    now: str
    """The time (RFC 3339 UTC) its deadline is judged against."""
    spent_usd: str = "0"
    """As in StartRun."""


class CancelTask(Command):
    reason: str | None = None


class RetryTask(Command):
    pass


class SendMessage(Command):
    message: str


class Review(Command):
    decision: t.Decision
    feedback: str | None = None


class RecordOutput(Command):
    run_id: str
    chunks: list[tuple[int, str, str]]
    """(seq, stream, chunk) in order."""
    fence: Fence | None = None


class RequestInput(Command):
    run_id: str
    prompt: str
    fence: Fence | None = None
    number: int = 1
    """The run's questions counted from 1: a resend of one already recorded records nothing."""
    after_seq: int | None = None
    """The last output seq before the question (None: not checked)."""


class StageArtifact(Command):
    """A file (its bytes stored already) for the task's next run."""

    file: File


class FinishRun(Command):
    run_id: str
    approval_id: str
    result: str | None
    fence: Fence | None = None
    usage: t.RunUsage | None = None
    """What the run spent, priced: recorded on its ending."""
    last_seq: int | None = None
    """The run's last output seq once `output` is recorded (None: not checked)."""
    output: list[tuple[int, str, str]] = []
    """The run's last output, as in RecordOutput: recorded in the same append as its end."""
    artifacts: list[File] = []
    """The files the run left under `outputs/` (their bytes stored already): recorded with its end."""


class FailRun(Command):
    run_id: str
    reason: t.FailureKind
    error: str
    fence: Fence | None = None
    usage: t.RunUsage | None = None
    last_seq: int | None = None
    exit_code: int | None = None
    result: str | None = None
    output: list[tuple[int, str, str]] = []
    """The run's last output, as in RecordOutput: recorded in the same append as its end."""
    artifacts: list[File] = []
    """The files the run left under `outputs/`, as in FinishRun."""


class LoseRun(Command):
    """The lease keeper's ending: the run's desktop stopped reporting, restarted, or lost its key."""

    run_id: str
    epoch: int
    error: str


class Renew(Command):
    """The lease check of a poll listing the run: records nothing, refused once the lease is lost."""

    run_id: str
    fence: Fence


# --- the task's decider ------------------------------------------------------

PATCHABLE_ANY_TIME = frozenset({"title", "metadata", "archived"})
"""The fields an `annotate` changes; any other is an `edit` (projections/lifecycle.py)."""


def decide(task: TaskState | None, command: Command) -> list[t.EventData]:
    if isinstance(command, CreateTask):
        if task is not None:
            raise Refused("already_exists", f"Task {task.id} already exists.")
        return [command.event]
    if task is None:
        raise Refused("not_found", "Task not found.")
    handler = _TASK_DECIDERS[type(command)]
    return handler(task, command)


def _camel(field: str) -> str:
    head, *rest = field.split("_")
    return head + "".join(word.title() for word in rest)


def _update(task: TaskState, c: UpdateTask) -> list[t.EventData]:
    changes = {k: v for k, v in c.changes.items() if getattr(task, k) != v}
    restricted = set(changes) - PATCHABLE_ANY_TIME
    if lifecycle.admits(task.status, "prioritise"):
        restricted.discard("priority")
    if restricted and not lifecycle.admits(task.status, "edit"):
        named = ", ".join(_camel(f) for f in sorted(restricted))  # the fields as the client sent them
        raise Refused(
            "invalid_status", f"Cannot change {named} of a task that is {task.status}; only title, metadata "
            f"and archived (and priority, while queued) change after a task has left "
            f"{lifecycle.either(lifecycle.admitting('edit'))}.",
        )
    if changes:
        _admitted(task, "annotate", "change")
    events: list[t.EventData] = []
    archived = changes.pop("archived", None)
    if changes:
        events.append(t.TaskUpdated(task_id=task.id, **changes))
    if archived is not None:
        events += _archived(task, archived)
    return events


def _archive(task: TaskState, c: ArchiveTask) -> list[t.EventData]:
    _admitted(task, "archive", "archive")
    return [] if task.archived == c.archived else _archived(task, c.archived)


def _archived(task: TaskState, archived: bool) -> list[t.EventData]:
    """The tombstone (or its undoing); an archived task's queued run leaves the queue with it."""
    events: list[t.EventData] = [t.TaskArchived(task_id=task.id, archived=archived)]
    if archived and task.status == lifecycle.QUEUED:
        events.append(t.TaskCancelled(task_id=task.id, run_id=task.run_id, reason="archived"))
    return events


def _start(task: TaskState, c: StartRun) -> list[t.EventData]:
    _admitted(task, "run", "run")
    if c.agent is None:
        raise Refused("agent_not_found", f"Agent {c.agent_id} not found.")
    kind = AGENT_KINDS[c.agent.kind]
    if kind.spawns_processes and not c.actor_is_admin:
        allowed = c.agent.config.get("allowedUsers", [])
        if "*" not in allowed and c.actor not in allowed:
            raise Refused(
                "forbidden", f"Agent {c.agent.name} runs processes as the service itself; only admins and "
                "the users its allowedUsers config names may run tasks on it.",
            )
    if c.agent.status != "active":
        raise Refused("agent_unavailable", f"Agent {c.agent.name} is {c.agent.status}; it takes no runs.")
    spent = usage.over_budget(c.agent.name, c.agent.config, c.spent_usd)
    if spent is not None:  # waiting would not cure it: only a larger budget does
        raise Refused("budget_exceeded", spent)
    if task.type not in kind.task_types:
        raise Refused(
            "agent_mismatch", f"A {task.type} task cannot run on agent {c.agent.name}: its kind, "
            f"{c.agent.kind}, runs {lifecycle.either(tuple(sorted(kind.task_types)))} tasks.",
        )
    never = _never_done(c.dependencies)
    if never is not None:  # waiting would not cure it
        raise Refused("dependency_not_done", never)
    try:
        desktop = _startable(task, c.agent.kind, c.running, c.limit, c.dependencies, c.desktops)
    except Refused as refused:
        if not c.queue or refused.code not in _QUEUEABLE:
            raise
        return [t.TaskQueued(
            task_id=task.id, run_id=c.run_id, agent_id=c.agent.id, priority=task.priority,
            queue_timeout_seconds=c.queue_timeout_seconds,
        )]
    return [t.TaskStarted(
        task_id=task.id, run_id=c.run_id, agent_id=c.agent.id, desktop_id=desktop.id, lease_epoch=desktop.epoch,
    ), *_recorded(task, c.run_id, task.staged, "input")]


_QUEUEABLE = frozenset({"dependency_not_done", "concurrency_limit", "desktop_unavailable", "desktop_full"})
"""The refusals a queued run waits out."""


def _never_done(dependencies: dict[str, str | None]) -> str | None:
    """Why a dependency will never be done (it is missing, failed or cancelled), if one won't."""
    for dep, status in dependencies.items():
        if status is None:
            return f"Dependency {dep} does not exist; it will never be done."
        if status in ("failed", "cancelled"):
            return f"Dependency {dep} is {status}; it will not be done unless it is retried."
    return None


def _startable(
    task: TaskState, kind: str, running: int, limit: int, dependencies: dict[str, str | None], desktops: list[Placement],
) -> Placement:
    """The desktop a run starts on now, or Refused saying what it waits for."""
    waiting = [dep for dep, status in dependencies.items() if status != "done"]
    if waiting:
        raise Refused("dependency_not_done", f"Dependency {waiting[0]} is not done yet.")
    if running >= limit:
        raise Refused("concurrency_limit", f"Maximum concurrent tasks ({limit}) reached", retry_after=5)
    return place(task.desktop_id, kind, desktops)


def _dispatch(task: TaskState, c: DispatchRun) -> list[t.EventData]:
    _admitted(task, "dispatch", "start a queued run of")
    if task.queue_deadline is not None and parse_rfc3339(c.now) >= parse_rfc3339(task.queue_deadline):
        waited = parse_rfc3339(c.now) - parse_rfc3339(task.queued_at or c.now)
        return [t.TaskFailed(
            task_id=task.id, run_id=task.run_id, reason="queue_timeout",
            error=f"The run waited {waited.total_seconds():.0f} s in the queue without starting; its "
            "queueTimeoutSeconds ran out.",
        )]
    never = _never_done(c.dependencies)
    if never is not None:
        return [t.TaskFailed(task_id=task.id, run_id=task.run_id, reason="dependency_failed", error=never)]
    if c.agent is None or c.agent.status != "active":  # paused: the run waits until it is resumed
        return []
    spent = usage.over_budget(c.agent.name, c.agent.config, c.spent_usd)
    if spent is not None:  # nothing but a larger budget would start it: it fails rather than wait for ever
        return [t.TaskFailed(task_id=task.id, run_id=task.run_id, reason="error", error=spent)]
    try:
        desktop = _startable(task, c.agent.kind, c.running, c.limit, c.dependencies, c.desktops)
    except Refused:
        return []
    return [t.TaskStarted(
        task_id=task.id, run_id=task.run_id or "", agent_id=c.agent.id, desktop_id=desktop.id,
        lease_epoch=desktop.epoch,
    ), *_recorded(task, task.run_id or "", task.staged, "input")]


def _recorded(task: TaskState, run_id: str, files: list[File], direction: t.ArtifactDirection) -> list[t.EventData]:
    """The files as the run's: the staged ones it consumes as it starts, or the outputs it left."""
    return [
        t.ArtifactRecorded(task_id=task.id, run_id=run_id, name=f.name, sha256=f.sha256, size=f.size,
                           content_type=f.content_type, direction=direction)
        for f in files
    ]


def _stage(task: TaskState, c: StageArtifact) -> list[t.EventData]:
    f = c.file
    return [t.ArtifactStaged(task_id=task.id, name=f.name, sha256=f.sha256, size=f.size, content_type=f.content_type)]


def place(desktop_id: str | None, kind: str, desktops: list[Placement]) -> Placement:
    """The desktop a run of an agent of `kind` goes to: the one named, or the online desktop hosting
    the kind with the most free slots (then by name)."""
    if desktop_id is not None:
        named = next((d for d in desktops if d.id == desktop_id), None)
        if named is None:
            raise Refused("desktop_unavailable", f"Desktop {desktop_id} is not registered; no worker runs it.")
        if named.status != "online":
            raise Refused("desktop_unavailable", f"Desktop {desktop_id} is {named.status}; it takes no new runs.")
        if kind not in named.agents:
            hosted = lifecycle.either(tuple(named.agents)) if named.agents else "none"
            raise Refused(
                "desktop_unavailable", f"Desktop {desktop_id} does not host {kind} agents; it hosts {hosted}.",
            )
        if named.busy >= named.capacity:
            raise Refused(
                "desktop_full", f"Desktop {desktop_id} is running {named.busy} of its {named.capacity} runs.",
                retry_after=5,
            )
        return named
    hosting = [d for d in desktops if d.status == "online" and kind in d.agents]
    if not hosting:
        raise Refused("desktop_unavailable", f"No online desktop hosts {kind} agents.")
    free = [d for d in hosting if d.busy < d.capacity]
    if not free:
        raise Refused(
            "desktop_full", f"Every online desktop hosting {kind} agents is at its capacity "
            f"({', '.join(d.id for d in sorted(hosting, key=lambda d: d.id))}).", retry_after=5,
        )
    return min(free, key=lambda d: (d.busy - d.capacity, d.id))


def _cancel(task: TaskState, c: CancelTask) -> list[t.EventData]:
    if task.status == "cancelled":
        return []
    _admitted(task, "cancel", "cancel")
    run_id = task.run_id if task.status in lifecycle.ACTIVE or task.status == lifecycle.QUEUED else None
    return [t.TaskCancelled(task_id=task.id, run_id=run_id, reason=c.reason)]


def _retry(task: TaskState, c: RetryTask) -> list[t.EventData]:
    _admitted(task, "retry", "retry")
    return [t.TaskRetried(task_id=task.id)]


def _message(task: TaskState, c: SendMessage) -> list[t.EventData]:
    _admitted(task, "message", "send a message to")
    return [t.TaskMessage(task_id=task.id, run_id=task.run_id or "", message=c.message)]


def _review(task: TaskState, c: Review) -> list[t.EventData]:
    _admitted(task, "review", "review")
    if task.approval_id is None:  # recorded with every review, in its append; without one, nothing to resolve
        raise Refused("invalid_status", "This task's review has no approval to resolve.")
    resolved = t.ApprovalResolved(
        approval_id=task.approval_id, task_id=task.id, decision=c.decision, feedback=c.feedback,
        artifacts=task.review_artifacts,
    )
    if c.decision == "approve":  # carrying the run's deliverable, as a completion without review does
        return [resolved, t.TaskCompleted(task_id=task.id, run_id=task.run_id or "", result=task.result)]
    reason = f"rejected: {c.feedback}" if c.feedback else "rejected"
    return [resolved, t.TaskFailed(task_id=task.id, run_id=task.run_id, reason="rejected", error=reason)]


def fenced(task: TaskState, run_id: str, fence: Fence | None, command: lifecycle.Command) -> None:
    """The lease check of every report on a run: it is the task's current run, its status admits
    the report, and (with a `fence`) the reporter is the desktop and epoch it was placed under.
    A report that fails it records nothing: RunOver says which part failed."""
    if task.run_id is None:
        raise RunOver(f"Task {task.id} has no run {run_id}; it is {task.status} and has never run.")
    if task.run_id != run_id:
        raise RunOver(f"Run {run_id} of task {task.id} was superseded by run {task.run_id}.")
    if not lifecycle.admits(task.status, command):
        ended = "was cancelled" if task.status == "cancelled" else f"has ended: the task is {task.status}"
        raise RunOver(f"Run {run_id} of task {task.id} {ended}.")
    if fence is None:
        return
    if fence.desktop_id != task.run_desktop_id:
        raise RunOver(f"Run {run_id} is placed on desktop {task.run_desktop_id}, not on {fence.desktop_id}.")
    if fence.epoch != task.lease_epoch:
        raise RunOver(
            f"Run {run_id} was placed under epoch {task.lease_epoch} of desktop {task.run_desktop_id}, and this "
            f"lease is of epoch {fence.epoch}: the run belongs to another worker session.",
        )


def _chunks(task: TaskState, run_id: str, chunks: list[tuple[int, str, str]]) -> list[t.EventData]:
    """The chunks not yet recorded, numbered on from the task's `output_seq`: a resent chunk is
    skipped; one past a hole refuses the whole batch."""
    last, fresh = task.output_seq, []
    for seq, stream, chunk in chunks:
        if seq <= last:
            continue
        if seq != last + 1:
            raise OutputGap(
                task.output_seq + 1, f"Output of run {run_id} continues at seq {last + 1}, but the next chunk "
                f"sent is seq {seq}; send from seq {task.output_seq + 1}.",
            )
        last = seq
        fresh.append(
            t.TaskOutput(task_id=task.id, run_id=run_id, seq=seq, stream=stream, chunk=chunk)  # type: ignore[arg-type]
        )
    return fresh


def _ending_output(
    task: TaskState, run_id: str, output: list[tuple[int, str, str]], last_seq: int | None
) -> list[t.EventData]:
    """An ending's output; with `last_seq`, the run's output must then be complete up to it."""
    fresh = _chunks(task, run_id, output)
    recorded = task.output_seq + len(fresh)
    if last_seq is not None and last_seq != recorded:
        raise OutputGap(
            recorded + 1, f"Run {run_id} ends after output seq {last_seq}, but the output recorded with this "
            f"ending reaches seq {recorded}; send from seq {recorded + 1}.",
        )
    return fresh


def _output(task: TaskState, c: RecordOutput) -> list[t.EventData]:
    fenced(task, c.run_id, c.fence, "output")
    return _chunks(task, c.run_id, c.chunks)


def _request_input(task: TaskState, c: RequestInput) -> list[t.EventData]:
    fenced(task, c.run_id, c.fence, "ask")
    if task.asks >= c.number:  # a resend of a question already recorded
        return []
    if c.after_seq is not None and c.after_seq != task.output_seq:
        raise OutputGap(
            task.output_seq + 1, f"Question {c.number} of run {c.run_id} follows output seq {c.after_seq}, but "
            f"the output recorded reaches seq {task.output_seq}; send the output first.",
        )
    return [t.TaskInputRequested(task_id=task.id, run_id=c.run_id, prompt=c.prompt)]


def _used(used: t.RunUsage | None) -> t.RunUsage | msgspec.UnsetType:
    """An ending's `usage`: absent, not null, when the agent reported none."""
    return msgspec.UNSET if used is None else used


def _finish(task: TaskState, c: FinishRun) -> list[t.EventData]:
    fenced(task, c.run_id, c.fence, "finish")
    output = _ending_output(task, c.run_id, c.output, c.last_seq) + _recorded(task, c.run_id, c.artifacts, "output")
    if task.status == "awaiting_input":  # API.md: awaiting_input leads to running or failed, never done
        return output + [t.TaskFailed(
            task_id=task.id, run_id=c.run_id, reason="error", result=c.result, usage=_used(c.usage),
            error="The run ended while it waited for input; its question was never answered.",
        )]
    if task.requires_approval:
        return output + [
            t.TaskReview(task_id=task.id, run_id=c.run_id, result=c.result, usage=_used(c.usage)),
            t.ApprovalCreated(approval_id=c.approval_id, task_id=task.id, run_id=c.run_id,
                              artifacts=[f.sha256 for f in c.artifacts]),
        ]
    return output + [t.TaskCompleted(task_id=task.id, run_id=c.run_id, result=c.result, usage=_used(c.usage))]


def _fail(task: TaskState, c: FailRun) -> list[t.EventData]:
    fenced(task, c.run_id, c.fence, "fail")
    return _ending_output(task, c.run_id, c.output, c.last_seq) + _recorded(task, c.run_id, c.artifacts, "output") + [
        t.TaskFailed(
            task_id=task.id, run_id=c.run_id, reason=c.reason, error=c.error, exit_code=c.exit_code,
            result=c.result, usage=_used(c.usage),
        )
    ]


def _lose(task: TaskState, c: LoseRun) -> list[t.EventData]:
    """Decided once, by whoever sees the lapse first: a run already ended or re-placed is left be."""
    if task.run_id != c.run_id or not lifecycle.admits(task.status, "lose") or task.lease_epoch != c.epoch:
        return []
    return [t.TaskFailed(task_id=task.id, run_id=c.run_id, reason="lost", error=c.error)]


def _renew(task: TaskState, c: Renew) -> list[t.EventData]:
    fenced(task, c.run_id, c.fence, "renew")
    return []


_TASK_DECIDERS = {
    UpdateTask: _update, ArchiveTask: _archive, StartRun: _start, CancelTask: _cancel,
    RetryTask: _retry, SendMessage: _message, Review: _review, RecordOutput: _output,
    RequestInput: _request_input, FinishRun: _finish, FailRun: _fail, LoseRun: _lose, Renew: _renew,
    DispatchRun: _dispatch, StageArtifact: _stage,
}


def resolve_approval(approval: Approval | None, task: TaskState | None, command: Review) -> list[t.EventData]:
    """The approvals door to the same decision as reviewing the task."""
    if approval is None or task is None:
        raise Refused("not_found", "Approval not found.")
    if approval.status != "pending" or task.approval_id != approval.id:
        raise Refused("invalid_status", f"Approval {approval.id} is already {approval.status}.")
    return decide(task, command)
