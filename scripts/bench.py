#!/usr/bin/env python
"""Benchmarks of Mission Control, each against the raw floor it stands on. Local files only.

    .venv/bin/python scripts/bench.py append [--events 100000] [--appenders 1000]
    .venv/bin/python scripts/bench.py replay [--events 1000000]

A subcommand is one function registered with @command; it prints its own figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import multiprocessing
import resource
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from events import ANY, GENESIS_HASH, Meta, RecordedEvent, decode  # noqa: E402
from events.envelope import chain_hash, encode_payload, now_rfc3339  # noqa: E402
from events.sqlite import COLUMNS, SCHEMA, SqliteLog  # noqa: E402
from events.types import TaskCompleted, TaskCreated, TaskOutput, TaskStarted  # noqa: E402

# --- shared helpers ------------------------------------------------------------------

COMMANDS: dict[str, tuple[Callable, str, tuple]] = {}


def command(name: str, help: str, *arguments: tuple[tuple[str, ...], dict]):
    """Registers a subcommand: `arguments` are (flags, add_argument keywords) pairs."""

    def register(fn: Callable) -> Callable:
        COMMANDS[name] = (fn, help, arguments)
        return fn

    return register


def events_option(default: int) -> tuple[tuple[str, ...], dict]:
    return ("--events",), {"type": int, "default": default, "help": f"how many events (default {default:,})"}


DIR_OPTION = (("--dir",), {"type": Path, "help": "where to put the database files (default: a temporary dir)"})


@contextlib.contextmanager
def workdir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
    else:
        with tempfile.TemporaryDirectory(prefix="mc-bench-") as tmp:
            yield Path(tmp)


def line(label: str, value: str, note: str = "") -> None:
    print(f"  {label:<34}{value:>16}   {note}".rstrip())


def rate(label: str, count: int, seconds: float) -> float:
    per_second = count / seconds
    line(label, f"{per_second:,.0f} ev/s", f"({count:,} in {seconds:.2f} s)")
    return per_second


def ratio(value: float, target: float) -> None:
    line("ratio", f"{value:.3f}", f"(target >= {target:.2f}: {'met' if value >= target else 'NOT met'})")


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"


def rss() -> int:
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def raw_connection(path: Path, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.executescript(SCHEMA)
    return conn


INSERT = f"INSERT INTO events ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?)"


# --- append ------------------------------------------------------------------------------


@command(
    "append", "concurrent single-event appends (group commit, durable) vs one raw executemany",
    events_option(100_000),
    (("--appenders",), {"type": int, "default": 1000, "help": "concurrent appenders (default 1,000)"}),
    DIR_OPTION,
)
async def bench_append(args: argparse.Namespace) -> None:
    appenders = args.appenders
    per_appender = max(1, args.events // appenders)
    total = appenders * per_appender
    print(f"append: {appenders:,} appenders x {per_appender:,} single-event appends, expected=ANY, "
          "own stream each, durable (synchronous=FULL, WAL)")
    with workdir(args.dir) as where:
        log = SqliteLog(where / "append.db", durable=True)
        await log.open()

        async def appender(n: int) -> None:
            stream = f"task-{n}"
            for seq in range(per_appender):
                chunk = TaskOutput(task_id=f"t{n}", run_id="r1", seq=seq, stream="stdout", chunk="hello\n")
                await log.append(stream, [chunk], expected=ANY)

        started = time.perf_counter()
        await asyncio.gather(*(appender(n) for n in range(appenders)))
        logged = time.perf_counter() - started
        await log.close()

        with contextlib.closing(sqlite3.connect(where / "append.db")) as conn:
            rows = conn.execute(f"SELECT {COLUMNS} FROM events ORDER BY position").fetchall()
        assert len(rows) == total, f"{len(rows)} events in the log, not {total}"

        # The floor: the very same rows, one transaction, same schema and durability.
        raw = _raw_insert(where / "raw.db", rows, len(rows))
        # And what no group commit here can beat: each appender awaits its own append, so a
        # commit holds at most one append per appender. Not a target; it says where time goes.
        grouped = _raw_insert(where / "grouped.db", rows, appenders)

    log_rate = rate("SqliteLog.append", total, logged)
    raw_rate = rate("raw executemany, one transaction", total, raw)
    ratio(log_rate / raw_rate, 0.5)
    grouped_rate = rate(f"raw, a transaction per {appenders:,} rows", total, grouped)
    line("  SqliteLog.append against it", f"{log_rate / grouped_rate:.3f}", "(the Python around each append)")
    line("  it against one transaction", f"{grouped_rate / raw_rate:.3f}", "(the ceiling of the ratio above)")


def _raw_insert(path: Path, rows: list[tuple], per_transaction: int) -> float:
    """Seconds to write `rows` with raw executemany, `per_transaction` rows per durable commit."""
    with contextlib.closing(raw_connection(path, "FULL")) as conn:
        started = time.perf_counter()
        for start in range(0, len(rows), per_transaction):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(INSERT, rows[start:start + per_transaction])
            conn.execute("COMMIT")
        return time.perf_counter() - started


# --- replay -------------------------------------------------------------------------------

_TASK_EVENTS = 10  # per task stream: created, started, 7 outputs, completed


def _replay_rows(count: int) -> Iterator[tuple]:
    """`count` small valid events with correct positions, versions and hash chain."""
    meta = msgspec.json.Encoder(order="sorted").encode(Meta())
    previous = GENESIS_HASH
    recorded_at = now_rfc3339()
    for position in range(1, count + 1):
        task, version = divmod(position - 1, _TASK_EVENTS)
        version += 1
        task_id = f"t{task}"
        if version == 1:
            data = TaskCreated(task_id=task_id, type="command", content="echo hi", project_id="p1",
                               created_by="bench")
        elif version == 2:
            data = TaskStarted(task_id=task_id, run_id="r1", agent_id="a1")
        elif version < _TASK_EVENTS:
            data = TaskOutput(task_id=task_id, run_id="r1", seq=version, stream="stdout", chunk="hi\n")
        else:
            data = TaskCompleted(task_id=task_id, run_id="r1", result="ok")
        payload = encode_payload(data)
        event = RecordedEvent(
            position=position, stream=f"task-{task_id}", version=version, type=data.event_type,
            payload=msgspec.Raw(payload), meta=msgspec.Raw(meta), recorded_at=recorded_at, hash="",
        )
        previous = chain_hash(previous, event)
        yield (position, event.stream, version, event.type, payload, meta, recorded_at, previous)


def _fill(path: str, count: int) -> None:
    """Runs in its own process, so its memory does not count against the folds measured after."""
    rows = _replay_rows(count)
    with contextlib.closing(raw_connection(Path(path), "OFF")) as conn:
        while batch := [row for _, row in zip(range(50_000), rows)]:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(INSERT, batch)
            conn.execute("COMMIT")


@command(
    "replay", "fold the whole log through read_all + decode vs a raw scan + untyped decode",
    events_option(1_000_000),
    (("--page",), {"type": int, "default": 5000, "help": "read_all page size (default 5,000, the API's max)"}),
    DIR_OPTION,
)
async def bench_replay(args: argparse.Namespace) -> None:
    count = args.events
    checkpoint = max(1, count // 4)
    print(f"replay: {count:,} small events ({_TASK_EVENTS} per task stream), folded into counts by type")
    with workdir(args.dir) as where:
        path = where / "replay.db"
        started = time.perf_counter()
        filler = multiprocessing.get_context("spawn").Process(target=_fill, args=(str(path), count))
        filler.start()
        filler.join()
        assert filler.exitcode == 0, "filling the log failed"
        line("filled (raw executemany, in a child)", f"{time.perf_counter() - started:.1f} s", mib(path.stat().st_size))

        log = SqliteLog(path, durable=False)
        await log.open()
        memory = {"before": (rss(), peak_rss())}
        counts: Counter[str] = Counter()
        output_chars = 0
        after = 0
        started = time.perf_counter()
        while page := (await log.read_all(after, args.page)).events:
            for event in page:
                data = decode(event)
                counts[event.type] += 1
                if type(data) is TaskOutput:
                    output_chars += len(data.chunk)
            after = page[-1].position
            if "quarter" not in memory and after >= checkpoint:
                memory["quarter"] = (rss(), peak_rss())
        logged = time.perf_counter() - started
        memory["end"] = (rss(), peak_rss())
        await log.close()
        assert sum(counts.values()) == count, f"folded {sum(counts.values()):,} events, not {count:,}"

        raw_counts: Counter[str] = Counter()
        raw_chars = 0
        started = time.perf_counter()
        with contextlib.closing(sqlite3.connect(path)) as conn:
            for event_type, payload in conn.execute("SELECT type, payload FROM events ORDER BY position"):
                data = msgspec.json.decode(payload)
                raw_counts[event_type] += 1
                if event_type == "task.output":
                    raw_chars += len(data["chunk"])
        raw = time.perf_counter() - started
        assert raw_counts == counts and raw_chars == output_chars

    log_rate = rate("read_all pages + events.decode", count, logged)
    raw_rate = rate("raw scan + msgspec.json.decode", count, raw)
    ratio(log_rate / raw_rate, 0.4)
    print("  memory of the read_all fold (current RSS / peak RSS):")
    labels = {"before": "before", "quarter": f"after {checkpoint:,} events", "end": f"after {count:,} events"}
    for key, (current, peak) in memory.items():
        line(labels[key], mib(current), f"peak {mib(peak)}")
    growth = memory["end"][1] - memory["quarter"][1]
    line(f"peak growth {checkpoint:,} -> {count:,}", mib(growth), "(flat: memory does not grow with the log)")


# --- subcommands kept in their own files, registered on this module's COMMANDS -------------------

sys.modules.setdefault("bench", sys.modules[__name__])  # so `from bench import command` finds this module
import bench_verify  # noqa: E402,F401  (scripts/bench_verify.py: verify)
import bench_http  # noqa: E402,F401  (scripts/bench_http.py: http)
import bench_sse  # noqa: E402,F401  (scripts/bench_sse.py: sse)
import bench_run  # noqa: E402,F401  (scripts/bench_run.py: run)


# --- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subcommands = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_, arguments) in COMMANDS.items():
        sub = subcommands.add_parser(name, help=help_)
        for flags, options in arguments:
            sub.add_argument(*flags, **options)
    args = parser.parse_args(argv)
    fn = COMMANDS[args.command][0]
    if inspect.iscoroutinefunction(fn):
        asyncio.run(fn(args))
    else:
        fn(args)


if __name__ == "__main__":
    main()
