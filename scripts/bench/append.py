"""`bench.py append`: concurrent single-event durable appends against the raw floor, on SQLite
(the default) or PostgreSQL (`--backend postgres`, `--database URL`); then one appender alone.

The floor is the very rows the log wrote, inserted raw with the same schema and durability:
by `sqlite3` on SQLite (scripts/bench/raw_sqlite.py), by psycopg 3 on PostgreSQL
(scripts/bench/raw_postgres.py, which also measures the ways the driver could send them).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from events import ANY, EventLog, open_log
from events.types import TaskOutput

from . import raw_postgres, raw_sqlite
from .common import DIR_OPTION, command, database, database_options, events_option, line, rate, ratio, workdir


async def appends(log: EventLog, appenders: int, per_appender: int, prefix: str = "task") -> float:
    """Seconds for `appenders` concurrent appenders to each await `per_appender` single-event
    appends to a stream of its own, one after another."""

    async def appender(n: int) -> None:
        stream = f"{prefix}-{n}"
        for seq in range(per_appender):
            chunk = TaskOutput(task_id=f"t{n}", run_id="r1", seq=seq, stream="stdout", chunk="hello\n")
            await log.append(stream, [chunk], expected=ANY)

    started = time.perf_counter()
    await asyncio.gather(*(appender(n) for n in range(appenders)))
    return time.perf_counter() - started


async def opened(storage: str) -> EventLog:
    log = open_log(storage, durable=True)
    await log.open()
    return log


async def alone(storage: str, count: int) -> float:
    """Seconds for one appender to await `count` appends, one at a time: a commit each."""
    log = await opened(storage)
    try:
        return await appends(log, 1, count, prefix="alone")
    finally:
        await log.close()


@command(
    "append", "concurrent single-event appends (group commit, durable) vs the same rows inserted raw; one appender alone",
    events_option(100_000),
    (("--appenders",), {"type": int, "default": 1000, "help": "concurrent appenders (default 1,000)"}),
    (("--alone",), {"type": int, "default": 1000,
                    "help": "appends by one appender awaiting each, on this backend and on SQLite (default 1,000)"}),
    *database_options(),
    DIR_OPTION,
)
async def bench_append(args: argparse.Namespace) -> None:
    appenders = args.appenders
    per_appender = max(1, args.events // appenders)
    total = appenders * per_appender
    with workdir(args.dir) as where, database(args) as url:
        postgres = url is not None
        storage = url or str(where / "append.db")
        durability = raw_postgres.describe(url) if postgres else "synchronous=FULL, WAL"
        print(f"append: {appenders:,} appenders x {per_appender:,} single-event appends, expected=ANY, "
              f"own stream each, durable ({durability})")
        log = await opened(storage)
        try:
            logged = await appends(log, appenders, per_appender)
        finally:
            await log.close()
        name = type(log).__name__ + ".append"
        if postgres:
            rows = raw_postgres.rows(url)
            floors = {way: raw_postgres.insert(url, rows, len(rows), way) for way in ("executemany", "execute", "copy")}
            raw, grouped = floors["executemany"], raw_postgres.insert(url, rows, appenders)
        else:
            rows = raw_sqlite.rows(Path(storage))
            raw = raw_sqlite.insert(where / "raw.db", rows, len(rows))
            # What no group commit here can beat: each appender awaits its own append, so a
            # commit holds at most one append per appender. Not a target; it says where time goes.
            grouped = raw_sqlite.insert(where / "grouped.db", rows, appenders)
        assert len(rows) == total, f"{len(rows)} events in the log, not {total}"
        single = await alone(storage, args.alone) if args.alone else 0.0
        single_sqlite = await alone(str(where / "alone.db"), args.alone) if args.alone and postgres else 0.0

    log_rate = rate(name, total, logged)
    raw_rate = rate("raw executemany, one transaction", total, raw)
    ratio(log_rate / raw_rate, None if postgres else 0.5)
    grouped_rate = rate(f"raw, a transaction per {appenders:,} rows", total, grouped)
    line(f"  {name} against it", f"{log_rate / grouped_rate:.3f}", "(the Python around each append)")
    line("  it against one transaction", f"{grouped_rate / raw_rate:.3f}", "(the ceiling of the ratio above)")
    if postgres:
        # What psycopg's way of sending rows costs: executemany runs in pipeline mode (no round
        # trip per row); COPY is the bulk path, as fast as any driver could put them in.
        execute_rate = rate("raw execute a row, one transaction", total, floors["execute"])
        line("  executemany (pipelined) against it", f"{raw_rate / execute_rate:.2f}x", "(what pipeline mode saves)")
        copy_rate = rate("raw COPY, one transaction", total, floors["copy"])
        line("  executemany against COPY", f"{raw_rate / copy_rate:.3f}", "(what the per-row protocol costs)")
    if args.alone:
        print(f"one appender awaiting each append ({args.alone:,} appends, a commit each)")
        alone_rate = rate(name, args.alone, single)
        if postgres:
            sqlite_rate = rate("SqliteLog.append", args.alone, single_sqlite)
            line("PostgreSQL against SQLite", f"{alone_rate / sqlite_rate:.3f}")
