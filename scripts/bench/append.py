"""`bench.py append`: concurrent single-event durable appends against one raw executemany."""

from __future__ import annotations

import argparse
import asyncio
import time

from events import ANY
from events.sqlite import SqliteLog
from events.types import TaskOutput

from . import raw_sqlite
from .common import DIR_OPTION, command, events_option, line, rate, ratio, workdir


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

        rows = raw_sqlite.rows(where / "append.db")
        assert len(rows) == total, f"{len(rows)} events in the log, not {total}"

        # The floor: the very same rows, one transaction, same schema and durability.
        raw = raw_sqlite.insert(where / "raw.db", rows, len(rows))
        # And what no group commit here can beat: each appender awaits its own append, so a
        # commit holds at most one append per appender. Not a target; it says where time goes.
        grouped = raw_sqlite.insert(where / "grouped.db", rows, appenders)

    log_rate = rate("SqliteLog.append", total, logged)
    raw_rate = rate("raw executemany, one transaction", total, raw)
    ratio(log_rate / raw_rate, 0.5)
    grouped_rate = rate(f"raw, a transaction per {appenders:,} rows", total, grouped)
    line("  SqliteLog.append against it", f"{log_rate / grouped_rate:.3f}", "(the Python around each append)")
    line("  it against one transaction", f"{grouped_rate / raw_rate:.3f}", "(the ceiling of the ratio above)")
