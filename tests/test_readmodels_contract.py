"""What every read-model backend must answer, tested through the ReadModels interface alone:
real events appended through the log of the same backend (`log_factory` runs each test once
per backend, and `read_models` pairs the log with its backend's read models)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from events import Meta
from events import types as t
from projections.readmodels import ReadModels, read_models
from projections.usage import Usage


def uid() -> str:
    return str(uuid.uuid4())


def created(task_id: str, project_id: str, **fields) -> t.TaskCreated:
    return t.TaskCreated(task_id=task_id, type="prompt", content=fields.pop("content", "do it"),
                         project_id=project_id, created_by="u1", **fields)


@pytest.fixture
async def models(log_factory) -> ReadModels:
    found = read_models(await log_factory())
    await found.prepare()
    return found


async def append(models: ReadModels, stream: str, *events: t.EventData):
    return await models.log.append(stream, list(events), meta=Meta(actor="tester"))


async def snapshot(models: ReadModels) -> tuple:
    """Every read there is, for comparing two states of the models."""
    tasks, total = await models.tasks(archived=None, limit=1000)
    return (
        [(x.id, x.version, x.status, x.watchers) for x in tasks], total, await models.approvals(None, None),
        await models.agents(), await models.projects(), await models.api_keys(), await models.counters(),
        await models.running_count(), await models.desktops(), await models.placements(),
        [x.id for x in await models.active_runs()],
        await models.usage(), await models.usage_by_agent(),
    )


async def test_a_task_by_id_with_its_watchers_and_as_it_stood(models):
    a, p = uid(), uid()
    first = await append(models, f"task-{a}", created(a, p, title="first"))
    await append(models, f"task-{a}", t.TaskUpdated(task_id=a, title="second"))
    await append(models, f"presence-{a}", t.PresenceMarked(task_id=a, device_id="phone"),
                 t.PresenceMarked(task_id=a, device_id="gone", ttl_seconds=-1))  # already expired

    task = await models.task(a)
    assert (task.id, task.title, task.version, task.project_id, task.watchers) == (a, "second", 2, p, ["phone"])
    assert (await models.task(a, with_watchers=False)).watchers == []
    assert (await models.task_as_of(a, first[-1].position)).title == "first"
    assert await models.task(uid()) is None
    assert await models.watchers([a, uid()]) == {a: ["phone"]}
    assert await models.watchers([]) == {}


async def test_many_tasks_read_at_once_each_come_with_their_own_watchers(models):
    # What many GETs at once ask: a backend may answer them together, but each its own task.
    p = uid()
    ids = [uid() for _ in range(40)]
    for n, task_id in enumerate(ids):
        await append(models, f"task-{task_id}", created(task_id, p, title=f"task {n}"))
        if n % 3 == 0:
            await append(models, f"presence-{task_id}", t.PresenceMarked(task_id=task_id, device_id=f"phone {n}"))
    wanted = [*ids, uid(), *ids[:5]]  # one that does not exist, and some asked for twice
    found = await asyncio.gather(*(models.task(task_id) for task_id in wanted))
    assert [x.id if x else None for x in found] == [*ids, None, *ids[:5]]
    assert [x.title for x in found[:40]] == [f"task {n}" for n in range(40)]
    assert [x.watchers for x in found[:40]] == [[f"phone {n}"] if n % 3 == 0 else [] for n in range(40)]
    assert found[0] is not found[41]  # each caller may change its own copy


async def test_a_task_with_nul_in_its_text_is_kept_whole_and_found(models):
    a, p = uid(), uid()
    await append(models, f"task-{a}", created(a, p, title="a\x00b", content="x\x00y"))
    task = await models.task(a)
    assert (task.title, task.content) == ("a\x00b", "x\x00y")
    assert [x.id for x in (await models.tasks(search="x"))[0]] == [a]


async def test_tasks_by_filter_newest_first_with_the_total(models):
    p1, p2 = uid(), uid()
    ids = [uid() for _ in range(6)]
    await append(models, f"task-{ids[0]}", created(ids[0], p1, content="100% sure", desktop_id="d1"))
    await append(models, f"task-{ids[1]}", created(ids[1], p1, content="a_b"),
                 t.TaskStarted(task_id=ids[1], run_id="r", agent_id="g1"))
    await append(models, f"task-{ids[2]}", created(ids[2], p2, content="plain", title="Needle in title"))
    await append(models, f"task-{ids[3]}", created(ids[3], p2, content="archived"), t.TaskArchived(task_id=ids[3]))
    await append(models, f"task-{ids[4]}", created(ids[4], p2, content="back\\slash"))
    await append(models, f"task-{ids[5]}", created(ids[5], p1, content="abb"))

    async def found(**filters) -> tuple[list[str], int]:
        tasks, total = await models.tasks(**filters)
        return [x.id for x in tasks], total

    live = [ids[5], ids[4], ids[2], ids[1], ids[0]]
    assert await found() == (live, 5)  # archived ones left out by default
    assert await found(archived=True) == ([ids[3]], 1)
    assert await found(archived=None) == ([ids[5], ids[4], ids[3], ids[2], ids[1], ids[0]], 6)
    assert await found(limit=2, offset=1) == (live[1:3], 5)
    assert await found(statuses=["running"]) == ([ids[1]], 1)
    assert await found(statuses=["pending", "running"]) == (live, 5)
    assert await found(statuses=[]) == (live, 5)  # no status filter
    assert await found(desktop_id="d1") == ([ids[0]], 1)
    assert await found(agent_id="g1") == ([ids[1]], 1)
    assert await found(project_ids=[p2]) == ([ids[4], ids[2]], 2)
    assert await found(project_ids=[]) == ([], 0)  # no project: nothing
    # Search is literal (no wildcards) and looks at the title too.
    assert await found(search="%") == ([ids[0]], 1)
    assert await found(search="_") == ([ids[1]], 1)
    assert await found(search="\\") == ([ids[4]], 1)
    assert await found(search="needle") == ([ids[2]], 1)
    assert await found(search="a_b") == ([ids[1]], 1)


async def test_approvals_with_their_tasks(models):
    p1, p2 = uid(), uid()
    a, b = uid(), uid()
    ap_a, ap_b = uid(), uid()
    for task_id, project, approval in ((a, p1, ap_a), (b, p2, ap_b)):
        await append(models, f"task-{task_id}", created(task_id, project, requires_approval=True),
                     t.TaskStarted(task_id=task_id, run_id="r", agent_id="g"),
                     t.TaskReview(task_id=task_id, run_id="r", result="draft"),
                     t.ApprovalCreated(approval_id=approval, task_id=task_id, run_id="r"))
    await append(models, f"task-{b}", t.ApprovalResolved(approval_id=ap_b, task_id=b, decision="approve"))

    def ids(found):
        return [(approval.id, task.id) for approval, task in found]

    assert ids(await models.approvals(None, None)) == [(ap_a, a), (ap_b, b)]  # oldest first
    assert ids(await models.approvals("pending", None)) == [(ap_a, a)]
    assert ids(await models.approvals("approved", None)) == [(ap_b, b)]
    assert ids(await models.approvals(None, [p2])) == [(ap_b, b)]
    assert ids(await models.approvals(None, [])) == []
    found = await models.approval(ap_a)
    assert (found.id, found.task_id, found.status) == (ap_a, a, "pending")
    assert await models.approval(uid()) is None


async def test_agents_projects_and_api_keys(models):
    g1, g2, p1, k1, k2 = uid(), uid(), uid(), uid(), uid()
    await append(models, f"agent-{g1}", t.AgentRegistered(agent_id=g1, name="one", kind="echo"))
    await append(models, f"agent-{g2}", t.AgentRegistered(agent_id=g2, name="two", kind="echo"),
                 t.AgentPaused(agent_id=g2))
    await append(models, f"project-{p1}", t.ProjectCreated(project_id=p1, name="p", members=["alice"]))
    await append(models, f"apikey-{k1}", t.ApiKeyIssued(key_id=k1, user="alice", scopes=["admin"], token_hash="h1"))
    await append(models, f"apikey-{k2}", t.ApiKeyIssued(key_id=k2, user="bob", scopes=["task:read"], token_hash="h2"),
                 t.ApiKeyRevoked(key_id=k2))

    assert [(x.id, x.status) for x in await models.agents()] == [(g1, "active"), (g2, "paused")]
    assert (await models.agent(g2)).name == "two" and await models.agent(uid()) is None
    assert [(x.id, x.members) for x in await models.projects()] == [(p1, ["alice"])]
    assert (await models.project(p1)).name == "p" and await models.project(uid()) is None
    assert (await models.api_key_by_hash("h1")).id == k1 and await models.api_key_by_hash("nope") is None
    assert (await models.api_key(k2)).revoked and await models.api_key(uid()) is None
    assert [(x.id, x.user) for x in await models.api_keys()] == [(k1, "alice"), (k2, "bob")]


async def test_counters_and_running_count(models):
    p = uid()
    zero = await models.counters()
    assert (zero.tasks["pending"], zero.active_desktops, zero.streams, zero.checkpoint) == (0, 0, 0, 0)
    ids = [uid() for _ in range(4)]
    for n, task_id in enumerate(ids):
        await append(models, f"task-{task_id}", created(task_id, p, desktop_id=f"d{n % 2}"))
    for task_id in ids[:3]:
        await append(models, f"task-{task_id}", t.TaskStarted(task_id=task_id, run_id="r", agent_id="g", desktop_id="d1"))
    await append(models, f"task-{ids[2]}", t.TaskInputRequested(task_id=ids[2], run_id="r", prompt="?"))
    await append(models, f"task-{ids[0]}", t.TaskCompleted(task_id=ids[0], run_id="r", result="ok"))
    g = uid()
    await append(models, f"agent-{g}", t.AgentRegistered(agent_id=g, name="g", kind="echo"))
    for name in ("d0", "d1", "d2"):
        await append(models, f"desktop-{name}", registered(name))
    await append(models, "desktop-d0", t.DesktopDraining(desktop_id="d0", by="admin"))
    await append(models, "desktop-d2", t.DesktopOffline(desktop_id="d2", epoch=1, reason="left"),
                 t.DesktopRemoved(desktop_id="d2"))

    figures = await models.counters()
    assert {s: n for s, n in figures.tasks.items() if n} == {"pending": 1, "running": 1, "awaiting_input": 1, "done": 1}
    assert figures.active_desktops == 1  # d1 is online; d0 draining, d2 removed
    assert (figures.active_agents, figures.approvals_pending, figures.streams) == (1, 0, 8)
    assert figures.checkpoint == models.log.head
    assert await models.running_count() == 2  # running and awaiting_input hold a run slot


def registered(name: str, epoch: int = 1, capacity: int = 2, agents: tuple[str, ...] = ("echo",)) -> t.DesktopRegistered:
    return t.DesktopRegistered(desktop_id=name, session_id=uid(), epoch=epoch, agents=list(agents), capacity=capacity)


async def test_desktops_by_name_and_a_removed_one_gone(models):
    await append(models, "desktop-zeta", registered("zeta"))
    await append(models, "desktop-alpha", registered("alpha", agents=("echo", "openai")))
    await append(models, "desktop-alpha", t.DesktopOffline(desktop_id="alpha", epoch=1, reason="silent"),
                 t.DesktopOnline(desktop_id="alpha", epoch=1))
    await append(models, "desktop-mid", registered("mid"), t.DesktopOffline(desktop_id="mid", epoch=1, reason="left"))

    assert [(d.id, d.status) for d in await models.desktops()] == [("alpha", "online"), ("mid", "offline"), ("zeta", "online")]
    alpha = await models.desktop("alpha")
    assert (alpha.agents, alpha.epoch, alpha.stream_version) == (["echo", "openai"], 1, 3)
    await append(models, "desktop-mid", t.DesktopRemoved(desktop_id="mid"))
    assert await models.desktop("mid") is None
    assert [d.id for d in await models.desktops()] == ["alpha", "zeta"]
    assert await models.desktop("never") is None


async def test_active_runs_busy_and_placements_count_current_runs_where_they_are_placed(models):
    p = uid()
    await append(models, "desktop-a", registered("a", epoch=1, capacity=3))
    await append(models, "desktop-b", registered("b", epoch=1, capacity=1),
                 t.DesktopDraining(desktop_id="b", by="worker"))
    ids = [uid() for _ in range(5)]
    for task_id in ids:
        await append(models, f"task-{task_id}", created(task_id, p))
    for task_id, where in zip(ids, ["a", "b", "a", "a", None]):
        await append(models, f"task-{task_id}", t.TaskStarted(task_id=task_id, run_id=f"r-{task_id}", agent_id="g",
                                                             desktop_id=where, lease_epoch=1))
    await append(models, f"task-{ids[2]}", t.TaskInputRequested(task_id=ids[2], run_id=f"r-{ids[2]}", prompt="?"))
    await append(models, f"task-{ids[3]}", t.TaskCompleted(task_id=ids[3], run_id=f"r-{ids[3]}"))
    # A task re-run elsewhere counts where its current run is.
    await append(models, f"task-{ids[0]}", t.TaskFailed(task_id=ids[0], run_id=f"r-{ids[0]}", reason="lost", error="x"),
                 t.TaskRetried(task_id=ids[0]),
                 t.TaskStarted(task_id=ids[0], run_id="again", agent_id="g", desktop_id="b", lease_epoch=1))

    assert [x.id for x in await models.active_runs("a")] == [ids[2]]  # running and awaiting_input alike
    assert [x.id for x in await models.active_runs("b")] == [ids[1], ids[0]]  # oldest placement first
    assert await models.active_runs("nowhere") == []
    assert (await models.active_runs("b"))[1].run_desktop_id == "b"
    assert await models.busy_by_desktop() == {"a": 1, "b": 2}  # the run placed before desktops is on none
    assert [(x.id, x.status, x.busy, x.capacity, x.epoch) for x in await models.placements()] == [
        ("a", "online", 1, 3, 1), ("b", "draining", 2, 1, 1)]


async def test_rebuild_and_refold_agree_with_the_live_projection(models, log_factory):
    p = uid()
    ids = [uid() for _ in range(30)]
    await asyncio.gather(*(
        append(models, f"task-{i}", created(i, p), t.TaskStarted(task_id=i, run_id="r", agent_id="g")) for i in ids
    ))
    await append(models, f"presence-{ids[0]}", t.PresenceMarked(task_id=ids[0], device_id="phone"))
    await append(models, "desktop-d", registered("d"), t.DesktopDraining(desktop_id="d", by="admin"))
    for n, i in enumerate(ids[2:12]):
        await append(models, f"task-{i}", t.TaskCompleted(task_id=i, run_id="r", usage=t.RunUsage(
            prompt_tokens=n, completion_tokens=1, cost_usd=f"0.{n:018}1")))  # 19 places: no float holds them
    live = await snapshot(models)
    assert live[-2].cost_usd == "0.000000000000000046"

    assert await models.rebuild() == models.log.head
    assert await snapshot(models) == live

    # Events appended by a log without read models (another process) are folded by refold.
    other = await log_factory.reopen(models.log)
    late = uid()
    await other.append(f"task-{late}", [created(late, p)])
    assert await models.task(late) is None
    assert await models.refold() == await other.read_head()
    assert (await models.task(late)).status == "pending"
    # ...or by the next append through the projecting log, before its own events.
    later = uid()
    await other.append(f"task-{later}", [created(later, p)])
    await append(models, f"task-{ids[1]}", t.TaskCompleted(task_id=ids[1], run_id="r"))
    assert (await models.task(later)).status == "pending"
    assert (await models.task(ids[1])).status == "done"
    assert (await models.counters()).checkpoint == await models.log.read_head()


def used(prompt: int, completion: int, cost: str | None) -> t.RunUsage:
    return t.RunUsage(prompt_tokens=prompt, completion_tokens=completion, cost_usd=cost)


async def test_usage_is_summed_per_agent_and_project_exactly_and_each_run_once(models):
    p1, p2 = uid(), uid()
    a, b, c, d, e = (uid() for _ in range(5))

    def run(task_id: str, run_id: str, agent: str) -> t.TaskStarted:
        return t.TaskStarted(task_id=task_id, run_id=run_id, agent_id=agent)

    await append(models, f"task-{a}", created(a, p1), run(a, "r1", "g1"),
                 t.TaskFailed(task_id=a, run_id="r1", reason="exit", error="x", usage=used(100, 10, "0.1")),
                 t.TaskRetried(task_id=a), run(a, "r2", "g2"),
                 t.TaskCompleted(task_id=a, run_id="r2", usage=used(5, 5, None)))  # g2 names no prices
    await append(models, f"task-{b}", created(b, p2, requires_approval=True), run(b, "r1", "g1"),
                 t.TaskReview(task_id=b, run_id="r1", usage=used(1, 2, "0.2")),
                 t.TaskCompleted(task_id=b, run_id="r1"))  # the approval: the same run, not counted again
    await append(models, f"task-{c}", created(c, p2), run(c, "r1", "g1"), t.TaskCancelled(task_id=c, run_id="r1"))
    await append(models, f"task-{d}", created(d, p1),  # queued, never started: it spent nothing
                 t.TaskQueued(task_id=d, run_id="r1", agent_id="g1"),
                 t.TaskFailed(task_id=d, run_id="r1", reason="queue_timeout", error="waited"))
    await append(models, f"task-{e}", created(e, p1))

    def usage(prompt: int, completion: int, cost: str, unpriced: int) -> Usage:
        return Usage(prompt_tokens=prompt, completion_tokens=completion, cost_usd=cost, unpriced_runs=unpriced)

    assert (await models.task(a)).usage == usage(105, 15, "0.1", 1)
    assert (await models.task(b)).usage == usage(1, 2, "0.2", 0)
    assert (await models.task(c)).usage == usage(0, 0, "0", 1)  # cancelled while running: its cost is not known
    assert (await models.task(d)).usage == (await models.task(e)).usage == Usage()
    assert await models.usage() == usage(106, 17, "0.3", 2)
    assert await models.usage(project_ids=[p1]) == usage(105, 15, "0.1", 1)
    assert await models.usage(project_ids=[]) == Usage()
    assert await models.usage("g1") == usage(101, 12, "0.3", 1)
    assert await models.usage("g1", [p2]) == usage(1, 2, "0.2", 1)
    assert await models.usage(uid()) == Usage()
    assert await models.usage_by_agent([p1]) == {"g1": usage(100, 10, "0.1", 0), "g2": usage(5, 5, "0", 1)}
    assert (await models.tasks(project_ids=[p2]))[0][0].usage == usage(0, 0, "0", 1)  # in listings too


async def test_the_queue_in_order_with_positions_and_sorted_listings(models):
    p = uid()
    ids = [uid() for _ in range(5)]
    for task_id in ids:
        await append(models, f"task-{task_id}", created(task_id, p))
    # Queued with priorities 1, 9, 5, 9 (first queued first within one), and one started at once.
    for task_id, priority in zip(ids, (1, 9, 5, 9)):
        await append(models, f"task-{task_id}", t.TaskQueued(task_id=task_id, run_id=f"r-{task_id}", agent_id="g",
                                                            priority=priority))
    await append(models, f"task-{ids[4]}", t.TaskStarted(task_id=ids[4], run_id="r", agent_id="g"))
    order = [ids[1], ids[3], ids[2], ids[0]]

    assert [x.id for x in await models.queued()] == order
    assert [x.id for x in await models.queued(limit=2)] == order[:2]
    assert [x.id for x in await models.queued(after=(9, (await models.task(ids[3])).queued_position))] == order[2:]
    assert await models.queue_positions([ids[0], ids[3], ids[4], uid()]) == {ids[0]: 4, ids[3]: 2}
    assert (await models.task(ids[2])).queue_position == 3
    assert (await models.task(ids[4])).queue_position is None
    found, total = await models.tasks(sort="queue")
    assert ([x.id for x in found], total) == ([*order, ids[4]], 5)  # queued first, then the others newest first
    assert [x.queue_position for x in found] == [1, 2, 3, 4, None]
    assert [x.id for x in (await models.tasks(statuses=["queued"], sort="queue", limit=2, offset=1))[0]] == order[1:3]
    assert (await models.counters()).tasks["queued"] == 4

    # A priority moves a task within the queue; starting, failing or cancelling takes it out.
    await append(models, f"task-{ids[0]}", t.TaskUpdated(task_id=ids[0], priority=10))
    await append(models, f"task-{ids[1]}", t.TaskStarted(task_id=ids[1], run_id=f"r-{ids[1]}", agent_id="g"))
    await append(models, f"task-{ids[2]}", t.TaskCancelled(task_id=ids[2], run_id=f"r-{ids[2]}"))
    assert [x.id for x in await models.queued()] == [ids[0], ids[3]]
    assert await models.queue_positions(ids) == {ids[0]: 1, ids[3]: 2}
    before = await models.queued()
    await models.rebuild()
    assert await models.queued() == before
    assert await models.queue_positions(ids) == {ids[0]: 1, ids[3]: 2}


async def watched_review(models: ReadModels, marks: dict[str, int]) -> tuple[str, int]:
    """A task created by u1 with devices a and b (b told of failures only), presence marked by u1
    from each device in `marks` with its ttl, then the task in review: its id and the review's position."""
    a = uid()
    await append(models, "devices-u1", t.DeviceRegistered(user_id="u1", device_id="a", kind="browser"),
                 t.DeviceRegistered(user_id="u1", device_id="b", kind="browser", events=["task.failed"]))
    await append(models, f"task-{a}", created(a, uid()))
    for device, ttl in marks.items():
        await models.log.append(f"presence-{a}", [t.PresenceMarked(task_id=a, device_id=device, ttl_seconds=ttl)],
                                meta=Meta(actor="u1"))
    review = await append(models, f"task-{a}", t.TaskReview(task_id=a, run_id="r"))
    return a, review[-1].position


async def test_devices_by_user_and_a_notification_pending_until_concluded(models):
    await append(models, "devices-u2", t.DeviceRegistered(user_id="u2", device_id="x", kind="webhook", url="http://h/"),
                 t.DeviceRegistered(user_id="u2", device_id="y", kind="browser"),
                 t.DeviceRegistered(user_id="u2", device_id="x", kind="slack", url="http://s/"),
                 t.DeviceRemoved(user_id="u2", device_id="y"))
    (x,) = await models.devices("u2")
    assert (x.device_id, x.kind, x.url, x.events) == ("x", "slack", "http://s/", list(t.NOTIFY_ON))
    assert await models.devices("nobody") == []

    task, position = await watched_review(models, {"b": -1})  # b's presence expired before the review
    (told,) = await models.pending_notifications()
    assert (told.user_id, told.device_id, told.task_id, told.cause.position, told.attempts) == ("u1", "a", task, position, 0)
    assert await models.pending_notifications(position) == [told]
    assert await models.pending_notifications(position + 1) == []

    cause = t.Cause(type="task.review", position=position)
    common = dict(delivery_id=told.id, device_id="a", task_id=task, cause=cause)
    await append(models, "devices-u1", t.NotificationFailed(**common, error="down", attempt=1))
    again = await models.pending_notification(told.id)
    assert (again.attempts, again.last_attempt_at is not None) == (1, True)
    await append(models, "devices-u1", t.NotificationSent(**common, text="told", attempt=2))
    assert await models.pending_notification(told.id) is None
    assert await models.pending_notifications() == []


async def test_live_presence_of_any_of_a_users_devices_tells_none_of_them(models):
    await watched_review(models, {"b": 60})
    assert await models.pending_notifications() == []


async def test_a_rebuild_decides_the_same_notifications(models):
    await watched_review(models, {})
    await watched_review(models, {"a": 60})
    before = await models.pending_notifications()
    assert len(before) == 1
    await models.rebuild()
    assert await models.pending_notifications() == before
