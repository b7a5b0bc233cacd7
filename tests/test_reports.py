"""The worker service (service/work/reports.py) in an app in this process, driven as a worker drives
it: register, poll, report output, ask and finish. What the log holds after each is the test."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from events import TypeFilter, decode, streams
from service.commands.deciders import OutputGap, Refused
from service.work import wire
from service.work.reports import WorkerIdentity
from tests.api_helpers import wait_for

WORKER = WorkerIdentity(desktop_id="w1", key_id=None)


class Worker:
    """A hand-driven worker of desktop w1, calling the app's `reports` on its loop."""

    def __init__(self, app):
        self.app, self.reports = app, app.state["reports"]
        self.session = str(uuid.uuid4())
        self.epoch = 0

    def register(self, session: str | None = None) -> wire.Registered:
        self.session = session or self.session
        registered = self.app.call(self.reports.register(WORKER, wire.Register(
            session_id=self.session, agents=["echo"], capacity=4,
        )))
        self.epoch = registered.epoch
        return registered

    def poll(self, free: int = 4, runs: list[wire.HeldRun] = ()) -> wire.PollAnswer:
        return self.app.call(self.reports.poll(WORKER, wire.Poll(epoch=self.epoch, free=free, runs=list(runs))))

    def output(self, run: wire.Assignment, *seqs: int) -> int:
        chunks = [wire.Chunk(seq=seq, stream="stdout", chunk=f"line {seq}\n") for seq in seqs]
        batch = wire.OutputBatch(chunks=chunks)
        return self.app.call(self.reports.output(WORKER, run.run_id, run.lease, batch)).acked_seq

    def finish(self, run: wire.Assignment, last_seq: int) -> str:
        ending = wire.Ending(outcome="done", result="fine", last_seq=last_seq)
        return self.app.call(self.reports.finish(WORKER, run.run_id, run.lease, ending, f"end-{run.run_id}")).status


@pytest.fixture
def app(make_app_server):
    return make_app_server(MC_LEASE_SECONDS="60")  # polls held up to 20 s: an answer sooner was woken


def _placed(app, client, worker: Worker) -> wire.Assignment:
    task = client.post("/tasks", json={"type": "prompt", "content": "hi", "desktopId": "w1"}).json()
    assert client.post(f"/tasks/{task['id']}/run").status_code == 200
    [assignment] = worker.poll().assignments
    assert assignment.task_id == task["id"] and assignment.lease == f"{assignment.run_id}:{worker.epoch}"
    return assignment


def _events(app, task_id: str, *types: str):
    return app.call(app.log.read_stream(streams.task(task_id), types=TypeFilter(list(types)) if types else None))


def test_register_answers_the_intervals_and_is_idempotent_per_session(app):
    worker = Worker(app)
    first = worker.register()
    assert (first.epoch, first.lease_seconds, first.poll_seconds) == (1, 60, 20)
    assert (first.chunk_bytes, first.flush_milliseconds, first.max_batch_chunks) == (16384, 50, 64)
    head = app.log.head
    assert worker.register().epoch == 1 and app.log.head == head  # a resend records nothing
    assert worker.register(session=str(uuid.uuid4())).epoch == 2


def test_overlapping_resends_record_each_seq_once_and_a_gap_records_nothing(app):
    worker = Worker(app)
    worker.register()
    run = _placed(app, app.client(), worker)
    assert worker.output(run, 1, 2) == 2
    assert worker.output(run, 2, 3) == 3  # the answer to the first was lost: resent with more
    assert worker.output(run, 1, 2, 3) == 3
    head = app.log.head
    with pytest.raises(OutputGap) as gap:
        worker.output(run, 5)
    assert gap.value.expected_seq == 4 and app.log.head == head
    outputs = [decode(e) for e in _events(app, run.task_id, "task.output")]
    assert [(o.seq, o.chunk) for o in outputs] == [(1, "line 1\n"), (2, "line 2\n"), (3, "line 3\n")]
    started = _events(app, run.task_id, "task.started")[-1]
    metas = [bytes(e.meta) for e in _events(app, run.task_id, "task.output")]
    assert all(b'"actor":"desktop:w1"' in m and b'"causationId":"%d"' % started.position in m for m in metas)


def test_a_finish_resent_answers_the_same_and_records_nothing(app):
    worker = Worker(app)
    worker.register()
    run = _placed(app, app.client(), worker)
    worker.output(run, 1)
    with pytest.raises(OutputGap):  # an ending never recorded with output missing
        worker.finish(run, last_seq=2)
    assert worker.finish(run, last_seq=1) == "done"
    head = app.log.head
    assert worker.finish(run, last_seq=1) == "done"
    assert app.log.head == head
    assert [e.type for e in _events(app, run.task_id)][-2:] == ["task.output", "task.completed"]
    held = wire.HeldRun(run_id=run.run_id, lease=run.lease)
    assert worker.poll(runs=[held]).ended == [wire.Ended(run_id=run.run_id, reason="finished")]


def test_a_report_under_an_old_epoch_after_a_new_session_is_lease_lost(app):
    worker = Worker(app)
    worker.register()
    run = _placed(app, app.client(), worker)
    worker.output(run, 1)
    worker.register(session=str(uuid.uuid4()))  # the worker restarted
    head = app.log.head
    with pytest.raises(Refused) as refused:
        worker.output(run, 2)
    assert refused.value.code == "lease_lost" and app.log.head == head
    [failed] = [decode(e) for e in _events(app, run.task_id, "task.failed")]
    assert failed.reason == "lost" and "restarted" in failed.error
    with pytest.raises(Refused) as stale:
        app.call(worker.reports.poll(WORKER, wire.Poll(epoch=1, free=1)))
    assert stale.value.code == "not_registered"


def test_messages_arrive_by_index_across_polls(app):
    worker, client = Worker(app), app.client()
    worker.register()
    run = _placed(app, client, worker)
    for text in ("first", "second"):
        assert client.post(f"/tasks/{run.task_id}/messages", json={"message": text}).status_code == 202
    held = wire.HeldRun(run_id=run.run_id, lease=run.lease, messages_seen=0)
    answer = worker.poll(runs=[held])
    assert [(m.index, m.message) for m in answer.messages] == [(1, "first"), (2, "second")]
    held = wire.HeldRun(run_id=run.run_id, lease=run.lease, messages_seen=1)
    assert [(m.index, m.message) for m in worker.poll(runs=[held]).messages] == [(2, "second")]


def test_a_held_poll_is_answered_when_a_run_is_placed(app):
    worker, client = Worker(app), app.client()
    worker.register()
    reports = worker.reports
    held = asyncio.run_coroutine_threadsafe(
        reports.poll(WORKER, wire.Poll(epoch=worker.epoch, free=1)), app._loop,
    )
    wait_for(lambda: [w.desktop_id for w in reports._waiters].count("w1") == 1, what="the poll to be held")
    task = client.post("/tasks", json={"type": "prompt", "content": "hi", "desktopId": "w1"}).json()
    client.post(f"/tasks/{task['id']}/run")
    answer = held.result(timeout=10)  # well before its 20 s expiry
    assert [a.task_id for a in answer.assignments] == [task["id"]]


def test_a_cancel_reaches_the_worker_as_an_ended_run(app):
    worker, client = Worker(app), app.client()
    worker.register()
    run = _placed(app, client, worker)
    client.post(f"/tasks/{run.task_id}/cancel")
    held = wire.HeldRun(run_id=run.run_id, lease=run.lease)
    assert worker.poll(runs=[held]).ended == [wire.Ended(run_id=run.run_id, reason="cancelled")]
    with pytest.raises(Refused) as refused:
        worker.output(run, 1)
    assert refused.value.code == "lease_lost" and "cancelled" in refused.value.detail


def test_a_report_past_its_deadline_ends_the_run_lost_first_and_is_refused(app):
    worker = Worker(app)
    worker.register()
    run = _placed(app, app.client(), worker)
    worker.output(run, 1)
    leases = worker.reports.leases
    app.call(leases.drop(run.run_id))
    app.call(leases.grant(run.run_id, run.task_id, -1))  # its deadline passed; no keeper there yet
    with pytest.raises(Refused) as refused:
        worker.output(run, 2)
    assert refused.value.code == "lease_lost" and "lease lapsed" in refused.value.detail
    [failed] = [decode(e) for e in _events(app, run.task_id, "task.failed")]
    assert failed.reason == "lost" and failed.error.startswith("Desktop w1 stopped reporting on this run")
    assert [decode(e).seq for e in _events(app, run.task_id, "task.output")] == [1]
    with pytest.raises(Refused):  # and again: recorded once
        worker.finish(run, last_seq=1)
    assert len(_events(app, run.task_id, "task.failed")) == 1


def test_a_restart_leaves_a_workers_run_to_its_lease_and_gives_the_nodes_desktop_a_new_session(make_app_server):
    first = make_app_server(MC_LEASE_SECONDS="60")
    worker, client = Worker(first), first.client()
    worker.register()
    run = _placed(first, client, worker)
    worker.output(run, 1)
    first.stop()

    second = make_app_server(first.data_dir, MC_LEASE_SECONDS="60")
    worker.app, worker.reports = second, second.state["reports"]
    assert worker.register().epoch == 1  # the same session: the same epoch, its leases valid
    assert worker.output(run, 1, 2) == 2  # a resend across the restart records only what is new
    assert worker.finish(run, last_seq=2) == "done"
    assert [decode(e).seq for e in _events(second, run.task_id, "task.output")] == [1, 2]
    assert second.call(second.models.desktop("local")).epoch == 2  # the node's own desktop: a new session


def test_an_ending_names_only_outputs_uploaded_under_the_runs_lease(app):
    worker = Worker(app)
    worker.register()
    run = _placed(app, app.client(), worker)
    store = app.state["artifacts"]

    async def upload() -> dict:
        await app.state["reports"].leased(WORKER, run.run_id, run.lease)  # the upload route's check

        async def body():
            yield b"the report\n"

        stored = await store.put(body(), 100)
        return {"name": "report.txt", "sha256": stored.sha256, "size": stored.size, "contentType": "text/plain"}

    uploaded = app.call(upload())
    never = {**uploaded, "sha256": "f" * 64}
    head = app.log.head
    for named in ([never], [{**uploaded, "name": "../up"}], [{"name": "x"}]):
        ending = wire.Ending(outcome="done", result="fine", artifacts=named)
        with pytest.raises(Refused) as refused:
            app.call(app.state["reports"].finish(WORKER, run.run_id, run.lease, ending, None))
        assert refused.value.code == "artifact_missing"
    assert app.log.head == head  # refused: nothing recorded
    ending = wire.Ending(outcome="done", result="fine", artifacts=[uploaded])
    assert app.call(app.state["reports"].finish(WORKER, run.run_id, run.lease, ending, None)).status == "done"
    recorded = [decode(e) for e in _events(app, run.task_id) if e.type == "artifact.recorded"]
    assert [(a.name, a.sha256, a.direction, a.run_id) for a in recorded] == [
        ("report.txt", uploaded["sha256"], "output", run.run_id)]
    with pytest.raises(Refused):  # the run is over: no more uploads under its lease
        app.call(app.state["reports"].leased(WORKER, run.run_id, run.lease))
