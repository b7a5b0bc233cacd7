"""What every EventLog backend must do, tested through the EventLog interface alone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Callable
from typing import ClassVar

import msgspec
import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

import events
from events import (
    ANY, NO_STREAM, EventData, EventLog, IdempotencyConflict, InvalidEvent, LogClosed, Meta,
    RecordedEvent, TypeFilter, WrongExpectedVersion,
)
from events.types import (
    ProjectCreated, TaskCompleted, TaskCreated, TaskOutput, TaskRetried, TaskStarted, TaskUpdated,
)
from tests.chain_audit import audit, canonical

# --- helpers -------------------------------------------------------------------------


def created(task_id: str = "t1", **fields) -> TaskCreated:
    fields = {"type": "prompt", "content": "do it", "project_id": "p1", "created_by": "u1", **fields}
    return TaskCreated(task_id=task_id, **fields)


def output(seq: int, task_id: str = "t1") -> TaskOutput:
    return TaskOutput(task_id=task_id, run_id="r1", seq=seq, stream="stdout", chunk=f"line {seq}\n")


class Noted(EventData):
    """Not a Mission Control type: its name shares the letters `task` but not the `task.` prefix."""

    event_type: ClassVar[str] = "taskish.noted"
    note: str


async def everything(log: EventLog, **filters) -> list[RecordedEvent]:
    """The whole log through read_all's paging, as a client would read it."""
    got, after = [], 0
    while True:
        page = await log.read_all(after, 97, **filters)
        if not page.events:
            return got
        got.extend(page.events)
        after = page.next


async def tail_until(log: EventLog, after: int, stop: Callable[[RecordedEvent], bool], **filters):
    got = []
    async with contextlib.aclosing(log.tail(after, **filters)) as tail:
        async for event in tail:
            got.append(event)
            if stop(event):
                return got


def positions(recorded: list[RecordedEvent]) -> list[int]:
    return [e.position for e in recorded]


# --- append and read -----------------------------------------------------------------


async def test_append_read_all_read_stream_head(log_factory):
    log = await log_factory()
    assert log.head == 0 and await log.read_head() == 0
    assert (await log.read_all()).events == []

    a1 = await log.append("task-a", [created("a"), TaskStarted(task_id="a", run_id="r", agent_id="g")],
                          meta=Meta(actor="alice", request_id="req-1"))
    b1 = await log.append("task-b", [created("b")])
    a2 = await log.append("task-a", [output(1, "a"), output(2, "a"), TaskCompleted(task_id="a", run_id="r")])

    assert positions(a1) == [1, 2] and positions(b1) == [3] and positions(a2) == [4, 5, 6]
    assert [e.version for e in a1 + a2] == [1, 2, 3, 4, 5] and b1[0].version == 1
    assert [e.type for e in a1] == ["task.created", "task.started"]
    assert events.decode(a1[0]) == created("a")
    assert events.decode_meta(a1[0]).actor == "alice" and events.decode_meta(a1[1]).request_id == "req-1"
    assert events.decode_meta(b1[0]).actor is None
    assert log.head == 6 and await log.read_head() == 6

    page = await log.read_all()
    assert page.events == a1 + b1 + a2 and page.next == 6
    assert await log.read_stream("task-a") == a1 + a2
    assert await log.read_stream("task-a", after_version=2) == a2
    assert await log.read_stream("task-a", limit=3) == a1 + a2[:1]
    assert await log.read_stream("task-a", until_position=4) == a1 + a2[:1]
    assert await log.read_stream("task-a", types=TypeFilter(["task.output"])) == a2[:2]
    assert await log.read_stream("nobody") == []


async def test_last_event_of_a_stream(log_factory):
    log = await log_factory()
    assert await log.last_event("task-a") is None
    first = await log.append("task-a", [created("a"), output(1, "a")])
    await log.append("task-b", [created("b")])  # a later event of another stream
    assert await log.last_event("task-a") == first[-1]
    more = await log.append("task-a", [output(n, "a") for n in range(2, 40)])
    assert await log.last_event("task-a") == more[-1]
    assert await log.last_event("task-") is None  # a prefix of a stream's name is another stream


async def test_positions_gapless_and_versions_per_stream(log_factory):
    log = await log_factory()
    rng = random.Random(7)
    for i in range(60):
        await log.append(f"task-{rng.randrange(5)}", [output(i)] * rng.randint(1, 3))
    recorded = await everything(log)
    assert positions(recorded) == list(range(1, log.head + 1))
    for stream in {e.stream for e in recorded}:
        assert [e.version for e in recorded if e.stream == stream] == list(
            range(1, sum(e.stream == stream for e in recorded) + 1)
        )


# --- expected versions -----------------------------------------------------------------


async def test_expected_version(log_factory):
    log = await log_factory()
    assert ANY is None and NO_STREAM == 0

    first = await log.append("task-a", [created("a")], expected=NO_STREAM)
    assert first[0].version == 1

    with pytest.raises(WrongExpectedVersion) as caught:
        await log.append("task-a", [created("a")], expected=NO_STREAM)
    assert (caught.value.stream, caught.value.expected, caught.value.actual) == ("task-a", 0, 1)

    second = await log.append("task-a", [output(1, "a"), output(2, "a")], expected=1)
    assert [e.version for e in second] == [2, 3]

    for stale in (1, 2, 4):
        with pytest.raises(WrongExpectedVersion) as caught:
            await log.append("task-a", [output(9, "a")], expected=stale)
        assert caught.value.actual == 3 and caught.value.expected == stale

    with pytest.raises(WrongExpectedVersion) as caught:
        await log.append("task-new", [created("n")], expected=2)
    assert caught.value.actual == 0

    # Nothing of a refused append was written, and no position was used up.
    assert log.head == 3 and await log.read_head() == 3
    assert await log.read_stream("task-new") == []
    anything = await log.append("task-a", [output(3, "a")], expected=ANY)
    assert (anything[0].position, anything[0].version) == (4, 4)


async def test_concurrent_appenders_to_one_stream(log_factory):
    """Optimistic concurrency under load: per version exactly one of 200 racing appends wins."""
    log = await log_factory()
    await log.append("elsewhere", [created("x")])
    for round_ in range(5):
        current = len(await log.read_stream("task-race"))
        outcomes = await asyncio.gather(
            *(log.append("task-race", [output(i, "race")], expected=current) for i in range(200)),
            *(log.append(f"task-{round_}-{i}", [created(str(i))]) for i in range(20)),  # bystanders
            return_exceptions=True,
        )
        assert all(isinstance(o, list) for o in outcomes[200:])
        outcomes = outcomes[:200]
        winners = [o for o in outcomes if isinstance(o, list)]
        losers = [o for o in outcomes if isinstance(o, WrongExpectedVersion)]
        assert len(winners) == 1 and len(losers) == 199, f"round {round_}: {outcomes[:3]}"
        assert winners[0][0].version == current + 1
        assert all(exc.actual == current + 1 and exc.expected == current for exc in losers)

    stream = await log.read_stream("task-race")
    assert [e.version for e in stream] == [1, 2, 3, 4, 5]
    assert audit(await everything(log)) == log.head == 1 + 5 * 21


# --- idempotency ------------------------------------------------------------------------


async def test_idempotent_append_returns_the_first_answer(log_factory):
    log = await log_factory()
    first = await log.append("task-a", [created("a"), output(1, "a")], expected=NO_STREAM,
                             idempotency_key="k1")
    await log.append("task-b", [created("b")])
    head = log.head

    # A retry, even with an expected version that is now stale, gets the recorded events back.
    again = await log.append("task-a", [created("a"), output(1, "a")], expected=NO_STREAM,
                             idempotency_key="k1")
    assert again == first
    assert log.head == head and await log.read_head() == head

    fingerprint, recorded = await log.idempotent("k1")
    assert recorded == first and isinstance(fingerprint, str)
    assert await log.idempotent("unused") is None

    # Any text is a key: the service joins a key's parts with NUL.
    joined = await log.append("task-c", [created("c")], idempotency_key="user\x00k1")
    assert await log.append("task-c", [created("c")], idempotency_key="user\x00k1") == joined
    assert (await log.idempotent("user\x00k1"))[1] == joined and await log.idempotent("user") is None


@pytest.mark.parametrize("stream, changed", [
    ("task-a", [created("a"), output(2, "a")]),  # another payload
    ("task-a", [created("a")]),  # fewer events
    ("task-z", [created("a"), output(1, "a")]),  # another stream
])
async def test_idempotency_key_reused_for_another_append(log_factory, stream, changed):
    log = await log_factory()
    await log.append("task-a", [created("a"), output(1, "a")], idempotency_key="k1")
    with pytest.raises(IdempotencyConflict) as caught:
        await log.append(stream, changed, idempotency_key="k1")
    assert caught.value.key == "k1"
    assert log.head == 2 and await log.read_head() == 2
    assert await log.read_stream("task-z") == []


async def test_concurrent_appends_with_one_key(log_factory):
    log = await log_factory()
    same = await asyncio.gather(
        *(log.append("task-a", [created("a")], idempotency_key="k") for _ in range(2))
    )
    assert same[0] == same[1] and log.head == 1

    outcomes = await asyncio.gather(
        log.append("task-b", [created("b")], idempotency_key="k2"),
        log.append("task-b", [created("other")], idempotency_key="k2"),
        return_exceptions=True,
    )
    assert sum(isinstance(o, list) for o in outcomes) == 1
    assert sum(isinstance(o, IdempotencyConflict) for o in outcomes) == 1
    assert log.head == 2 and len(await log.read_stream("task-b")) == 1


# --- invalid events -----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    pytest.param([created(priority=99)], id="priority-out-of-range"),
    pytest.param([created(priority="high")], id="str-for-int"),
    pytest.param([TaskOutput(task_id="t", run_id="r", seq="1", stream="stdout", chunk="x")], id="str-seq"),
    pytest.param([TaskStarted(task_id=5, run_id="r", agent_id="g")], id="int-for-str"),
    pytest.param([created(type="dance")], id="not-a-literal"),
    pytest.param([TaskUpdated(task_id="t", priority=0)], id="update-out-of-range"),
    pytest.param([created("ok"), created("bad", priority=11)], id="second-of-two"),
    pytest.param([created(metadata={"x": object()})], id="unencodable"),
    pytest.param([created(content="\ud800")], id="lone-surrogate"),
])
async def test_invalid_events_are_refused_before_anything_is_written(log_factory, bad):
    log = await log_factory()
    await log.append("task-a", [created("a")])
    with pytest.raises(InvalidEvent):
        await log.append("task-b", bad)
    assert log.head == 1 and await log.read_head() == 1
    assert await log.read_stream("task-b") == []
    assert (await log.append("task-b", [created("b")]))[0].position == 2


@pytest.mark.parametrize("number", [0.5, -0.0, 1.0, 1e16, 1e-7, 2.5e-8, 1e300, 2**70, -(2**63) - 1])
async def test_numbers_in_payloads_stay_verifiable(log_factory, number):
    """An auditor re-serialises payloads with json.dumps: the log keeps no number it would write otherwise."""
    log = await log_factory()
    try:
        await log.append("task-a", [created(metadata={"n": number, "list": [number]})])
    except InvalidEvent:
        assert log.head == 0 and await log.read_head() == 0
        assert isinstance(number, float), "integers are always exact"
        return
    recorded = await everything(log)
    assert audit(recorded) == 1
    assert events.decode(recorded[0]).metadata["n"] == number
    if number in (0.5, 1.0) or isinstance(number, int):
        assert json.loads(bytes(recorded[0].payload))["metadata"]["n"] == number


# --- read_all: filters, paging, until -------------------------------------------------------


async def _mixed_log(log: EventLog) -> list[RecordedEvent]:
    recorded = []
    for i in range(40):
        stream = f"task-{i % 4}"
        if i % 5 == 0:
            recorded += await log.append(stream, [created(stream)])
        elif i % 5 == 1:
            recorded += await log.append(stream, [Noted(note=f"n{i}")])
        elif i % 5 == 2:
            recorded += await log.append(f"project-{i}", [ProjectCreated(project_id=f"p{i}", name="P")])
        else:
            recorded += await log.append(stream, [output(i, stream), output(i + 1, stream)])
    return recorded


@pytest.mark.parametrize("filters, keep", [
    pytest.param({}, lambda e: True, id="all"),
    pytest.param({"streams": ["task-1", "task-3"]}, lambda e: e.stream in ("task-1", "task-3"), id="streams"),
    pytest.param({"types": TypeFilter(["task.created"])}, lambda e: e.type == "task.created", id="exact"),
    pytest.param({"types": TypeFilter(["task.created", "project.created"])},
                 lambda e: e.type.endswith(".created"), id="two-exact"),
    pytest.param({"types": TypeFilter(["task."])}, lambda e: e.type.startswith("task."), id="prefix-dot"),
    pytest.param({"types": TypeFilter(["task.*"])}, lambda e: e.type.startswith("task."), id="prefix-star"),
    pytest.param({"types": TypeFilter(["task*"])}, lambda e: e.type.startswith("task"), id="bare-star"),
    pytest.param({"types": TypeFilter(["task"])}, lambda e: False, id="not-a-prefix"),
    pytest.param({"types": TypeFilter([])}, lambda e: False, id="no-types"),
    pytest.param({"streams": ["task-2"], "types": TypeFilter(["task.output", "taskish."])},
                 lambda e: e.stream == "task-2" and e.type in ("task.output", "taskish.noted"), id="both"),
])
async def test_read_all_filters_and_paging(log_factory, filters, keep):
    log = await log_factory()
    recorded = await _mixed_log(log)
    wanted = [e for e in recorded if keep(e)]
    assert (await log.read_all(0, 5000, **filters)).events == wanted

    got, after, pages = [], 0, 0
    while True:
        page = await log.read_all(after, 3, **filters)
        assert len(page.events) <= 3 and all(e.position > after for e in page.events)
        assert page.next >= after
        if not page.events:
            assert page.next == log.head  # a reader at the end resumes from the head
            break
        got.extend(page.events)
        after, pages = page.next, pages + 1
    assert got == wanted
    assert pages == -(-len(wanted) // 3)


async def test_read_all_until(log_factory):
    log = await log_factory()
    recorded = await _mixed_log(log)
    page = await log.read_all(0, 500, until=10)
    assert page.events == recorded[:10] and page.next == 10
    page = await log.read_all(5, 3, until=10)
    assert positions(page.events) == [6, 7, 8] and page.next == 8
    page = await log.read_all(8, 3, until=10)
    assert positions(page.events) == [9, 10] and page.next == 10
    assert (await log.read_all(10, 500, until=10)).events == []
    # A filter that matches nothing before `until` still moves the reader to `until`.
    page = await log.read_all(0, 500, until=2, types=TypeFilter(["project."]))
    assert page.events == [] and page.next == 2


# --- the live tail ---------------------------------------------------------------------------


async def test_a_read_cancelled_half_way_hides_no_later_commit(log_factory):
    """A reader that goes away mid-read (a stream client disconnecting) must not leave the log
    reading an old snapshot: a tail would then skip events it never saw."""
    log = await log_factory(readers=1)
    for n in range(20):
        await log.append(f"s-{n}", [TaskRetried(task_id=str(n))])
    for n in range(50):
        reading = asyncio.create_task(log.read_all(0, 10))
        await asyncio.sleep(0)  # let it start, then abandon it
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        (appended,) = await log.append(f"new-{n}", [TaskRetried(task_id="x")])
        assert [e.position for e in await log.read_stream(f"new-{n}")] == [appended.position]
        page = await log.read_all(appended.position - 1, 10)
        assert [e.position for e in page.events] == [appended.position]


async def test_tail_from_zero_sees_history_then_live(log_factory):
    log = await log_factory()
    for i in range(30):
        await log.append(f"task-{i % 3}", [output(i)])

    seen: list[RecordedEvent] = []
    history_seen = asyncio.Event()

    async def consume():
        async with contextlib.aclosing(log.tail(0)) as tail:
            async for event in tail:
                seen.append(event)
                if len(seen) == 30:
                    history_seen.set()
                if len(seen) == 50:
                    return

    consumer = asyncio.create_task(consume())
    await asyncio.wait_for(history_seen.wait(), 10)
    for i in range(30, 50):  # live: the tail is now waiting for these
        await log.append(f"task-{i % 3}", [output(i)])
    await asyncio.wait_for(consumer, 10)
    assert seen == await everything(log)


@pytest.mark.parametrize("recent_capacity", [None, 8], ids=["cached", "tiny-cache"])
async def test_tail_joined_midway_during_appends(log_factory, recent_capacity):
    """Joining mid-way while appends go on: each event exactly once, in order, no seam gap."""
    log = await log_factory()
    if recent_capacity:
        log.recent_capacity = recent_capacity  # forces the tail to read history from storage
    for i in range(100):
        await log.append(f"task-{i % 7}", [output(i)])
    going = asyncio.Event()

    async def produce():
        for round_ in range(20):
            await asyncio.gather(*(
                log.append(f"task-{k}", [output(round_ * 10 + k)] * (1 + k % 2)) for k in range(10)
            ))
            if round_ == 2:
                going.set()
        await log.append("sentinel", [TaskRetried(task_id="end")])

    producer = asyncio.create_task(produce())
    await going.wait()
    start = log.head // 2
    got = await asyncio.wait_for(tail_until(log, start, lambda e: e.stream == "sentinel"), 30)
    await producer
    assert got == [e for e in await everything(log) if e.position > start]
    assert got[-1].stream == "sentinel"


async def test_a_filter_naming_a_nul_matches_nothing_rather_than_failing(log_factory):
    """A client's `stream` or `types` may hold any character; one that no backend can store
    names nothing stored."""
    log = await log_factory()
    await log.append("task-a", [created("a")])
    assert (await log.read_all(streams=["task-a\x00", "a\x00b"])).events == []
    assert (await log.read_all(types=TypeFilter(["task.created\x00", "ta\x00sk."]))).events == []
    assert len((await log.read_all(streams=["task-a", "a\x00b"])).events) == 1


async def test_tail_filters(log_factory):
    log = await log_factory()
    recorded = await _mixed_log(log)
    live = asyncio.create_task(tail_until(
        log, 0, lambda e: e.stream == "task-end", types=TypeFilter(["task.created"]),
        streams=["task-0", "task-end"],
    ))
    await log.append("task-other", [created("no")])  # filtered out
    await log.append("task-end", [created("end")])
    got = await asyncio.wait_for(live, 10)
    assert got[:-1] == [e for e in recorded if e.type == "task.created" and e.stream == "task-0"]
    assert got[-1].stream == "task-end" and got[-1].position == log.head


async def test_tail_sees_another_writer_on_the_same_storage(log_factory):
    writer = await log_factory()
    reader = await log_factory.reopen(writer)
    tail = asyncio.create_task(tail_until(reader, 0, lambda e: e.stream == "task-end"))
    for i in range(20):
        await writer.append("task-a", [output(i, "a")])
    await writer.append("task-end", [created("end")])
    got = await asyncio.wait_for(tail, 10)
    assert got == await everything(writer)
    # Both writers extend one chain: the reader's append comes after the writer's.
    mine = await reader.append("task-b", [created("b")])
    assert mine[0].position == 22
    assert audit(await everything(writer)) == 22


async def test_exclusive_has_one_holder_across_logs_on_one_storage(log_factory):
    """Holders in two logs on one storage (two processes, or two nodes) never overlap: each
    read-then-append under the lock sees every earlier holder's append."""
    first = await log_factory()
    second = await log_factory.reopen(first)
    inside, most = 0, 0

    async def decide(log: EventLog, n: int) -> None:
        nonlocal inside, most
        async with log.exclusive("admission"):
            inside += 1
            most = max(most, inside)
            seen = (await log.last_event("task-count") or None)
            await log.append("task-count", [output(n, "count")], expected=seen.version if seen else NO_STREAM)
            await asyncio.sleep(0.001)  # another holder would be let in here
            inside -= 1

    await asyncio.gather(*(decide(log, n) for n, log in enumerate([first, second] * 10)))
    assert most == 1
    assert len(await first.read_stream("task-count")) == 20  # no expected version was ever stale


async def test_exclusive_is_given_back_by_a_waiter_cancelled_and_by_a_closed_log(log_factory):
    first = await log_factory()
    second = await log_factory.reopen(first)
    held = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        async with first.exclusive("admission"):
            held.set()
            await release.wait()

    holder = asyncio.create_task(hold())
    await held.wait()
    waiter = asyncio.create_task(second.exclusive("admission").__aenter__())
    await asyncio.sleep(0.05)
    assert not waiter.done()  # the other log holds it
    waiter.cancel()
    release.set()
    await holder
    with contextlib.suppress(asyncio.CancelledError):
        await waiter
    async with asyncio.timeout(10):
        async with second.exclusive("admission"):  # the cancelled waiter gave it back
            pass
        third = await log_factory.reopen(first)
        holding = first.exclusive("admission")
        await holding.__aenter__()
        await first.close()  # a process that ends holding it (a killed one too) frees it
        async with third.exclusive("admission"):
            pass


async def test_a_tailer_sees_every_position_once_in_order_while_two_logs_append(log_factory):
    """Two logs on one storage (two processes, or two nodes) appending at once: positions stay
    gapless, one chain, and a third log's tail never sees a position before an earlier one."""
    first = await log_factory()
    second = await log_factory.reopen(first)
    reader = await log_factory.reopen(first)
    writers, appends = 8, 25
    total = 2 * writers * appends
    tail = asyncio.create_task(tail_until(reader, 0, lambda e: e.position >= total))

    async def write(log: EventLog, n: int) -> None:
        for i in range(appends):
            await log.append(f"task-{n}", [output(i, str(n))])

    await asyncio.gather(*(write(log, n) for n, log in enumerate([first, second] * writers)))
    got = await asyncio.wait_for(tail, 30)
    assert positions(got) == list(range(1, total + 1))
    assert got == await everything(second) and audit(got) == total


# --- the hash chain ------------------------------------------------------------------------


async def test_hash_chain_matches_an_independent_audit(log_factory):
    log = await log_factory()
    tricky = "Ünïcødé ✓ 😀 \x00\x01\x1f\x7f\t\n\r\"\\/\u2028\ufeff </script>"
    await log.append("task-ü", [
        created("ü", title=tricky, content=tricky, description=None, priority=10, depends_on=["a", "é"],
                metadata={"z": [1, {"b": None, "a": True}], "é": tricky, "A": -(2**53), "": {}, "n": []}),
        TaskUpdated(task_id="ü", title=None, priority=1),  # unset fields are left out
    ], meta=Meta(actor="ädmin ✓", request_id="r\n1", causation_id="c"))
    await log.append("notes", [Noted(note=tricky)])
    await asyncio.gather(*(log.append(f"task-{i}", [output(i), created(str(i))]) for i in range(20)))

    recorded = await everything(log)
    assert audit(recorded) == log.head == 43
    served = msgspec.json.decode(msgspec.json.encode(recorded[0]))
    assert set(served) == {"position", "stream", "version", "type", "payload", "meta", "recordedAt", "hash"}
    assert set(json.loads(bytes(recorded[1].payload))) == {"taskId", "title", "priority"}


json_text = st.text(st.characters(codec="utf-8")) | st.text(  # any text, text dense in escapes, and
    # characters on both sides of the UTF-16 surrogates, where code-point and RFC 8785 order differ
    "\x00\x08\t\n\x0b\x0c\r\x1f\x7f\"\\/\u2028\ufeffé€😀aZ\ue000\uffff\U00010000\U000e0067"
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53 - 1), 2**53 - 1) | json_text,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(json_text, inner, max_size=6),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_canonical_json_is_rfc8785_as_json_dumps_and_the_rfc8785_package_write_it(value):
    assert events.canonical_json(value) == canonical(value) == rfc8785.dumps(value)


# --- projectors ------------------------------------------------------------------------------
# What a projector writes commits or rolls back with the append: each backend's read models
# show it (tests/test_readmodels_contract.py), and tests/test_log_<backend>.py with its own handle.


class Refused(Exception):
    pass


class Seen:
    """A projector that checks what it is handed against its transaction's view of the log, and
    notes every position it was handed; it refuses one stream's events."""

    def __init__(self, refuse_stream: str | None = None):
        self.refuse_stream = refuse_stream
        self.positions: list[int] = []

    def __call__(self, tx: events.Transaction, recorded: list[RecordedEvent]) -> None:
        first, last = recorded[0].position, recorded[-1].position
        assert tx.read_events(first - 1, last, len(recorded) + 1) == recorded  # in this transaction's view
        self.positions.extend(e.position for e in recorded)
        if any(e.stream == self.refuse_stream for e in recorded):
            raise Refused(self.refuse_stream)


async def test_projector_sees_every_appended_event_in_the_transaction(log_factory):
    seen = Seen()
    log = await log_factory(projector=seen)
    await log.append("task-a", [created("a"), output(1, "a")])
    await asyncio.gather(*(log.append(f"task-{i}", [created(str(i))] * (1 + i % 3)) for i in range(30)))
    await log.append("task-a", [created("a")], idempotency_key="k")
    await log.append("task-a", [created("a")], idempotency_key="k")  # replayed: nothing new to project
    assert log.head == 2 + 60 + 1
    assert seen.positions == [e.position for e in await everything(log)]  # each once, in order


async def test_projector_failure_fails_only_its_append(log_factory):
    seen = Seen(refuse_stream="task-poison")
    log = await log_factory(projector=seen)
    appends = [log.append(f"task-{i}", [created(str(i)), output(1, str(i))]) for i in range(20)]
    appends.insert(7, log.append("task-poison", [created("p"), output(1, "p")]))
    outcomes = await asyncio.gather(*appends, return_exceptions=True)

    assert isinstance(outcomes.pop(7), Refused)
    assert all(isinstance(o, list) and len(o) == 2 for o in outcomes)
    assert await log.read_stream("task-poison") == []
    assert log.head == 40
    recorded = await everything(log)
    assert sorted((e for o in outcomes for e in o), key=lambda e: e.position) == recorded
    assert {e.position for e in recorded} <= set(seen.positions)
    assert audit(recorded) == 40

    with pytest.raises(Refused):  # alone, too
        await log.append("task-poison", [created("p")])
    assert log.head == await log.read_head() == 40
    await log.append("task-after", [created("after")])
    assert seen.positions[-1] == log.head == 41


# --- closing and reopening -----------------------------------------------------------------------


async def test_close_drains_accepted_appends_then_refuses(log_factory):
    log = await log_factory()
    outcomes = await asyncio.gather(
        *(log.append(f"task-{i}", [created(str(i))], idempotency_key=f"k{i}") for i in range(50)),
        log.close(),
    )
    assert all(isinstance(o, list) for o in outcomes[:50])
    with pytest.raises(LogClosed):
        await log.append("task-late", [created("late")])

    reopened = await log_factory.reopen(log)
    assert reopened.head == 50
    recorded = await everything(reopened)
    assert recorded == [o[0] for o in sorted(outcomes[:50], key=lambda o: o[0].position)]
    # Idempotency keys outlive the process that used them.
    assert await reopened.append("task-3", [created("3")], idempotency_key="k3") == outcomes[3]
    with pytest.raises(IdempotencyConflict):
        await reopened.append("task-3", [created("x")], idempotency_key="k3")
    assert (await reopened.append("task-3", [output(1, "3")], expected=1))[0].position == 51
    assert audit(await everything(reopened)) == 51
