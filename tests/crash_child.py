"""A separate process appending to a SQLite log, for the crash and two-process tests.

    python -m tests.crash_child DB [--count N] [--stream S] [--actor A] [--concurrency C] [--multi]
                                   [--run-id R] [--pause-after N]

Prints `ready` once the log is open, then `<position> <hash>` for every event of an
append, flushed, only after the append returned: each line is an acknowledged write.
Without --count it appends until killed. With --pause-after N it prints `paused` after its N-th
append and waits for a line on stdin before going on, so another writer can be placed there.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys

from events import Meta, open_log
from events.types import TaskOutput


async def run(args: argparse.Namespace) -> None:
    log = open_log(args.db, durable=True)
    await log.open()
    print("ready", flush=True)
    numbers = iter(range(args.count)) if args.count is not None else itertools.count()
    meta = Meta(actor=args.actor)

    async def appender(worker: int) -> None:
        for n in numbers:  # shared by the appenders: each number is appended once
            size = 1 + n % 3 if args.multi else 1
            chunk = [
                TaskOutput(task_id=f"t{worker}", run_id=args.run_id, seq=n, stream="stdout", chunk=f"{n}/{i} ✓\n")
                for i in range(size)
            ]
            recorded = await log.append(args.stream or f"task-{worker}", chunk, meta=meta)
            sys.stdout.write("".join(f"{e.position} {e.hash}\n" for e in recorded))
            sys.stdout.flush()
            if n + 1 == args.pause_after:
                print("paused", flush=True)
                await asyncio.to_thread(sys.stdin.readline)

    await asyncio.gather(*(appender(w) for w in range(args.concurrency)))
    await log.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("--count", type=int, help="appends to make; forever if left out")
    parser.add_argument("--stream", help="one stream for every append (default: one per appender)")
    parser.add_argument("--actor", default="child")
    parser.add_argument("--run-id", default="r", help="the runId of every event, to tell runs apart")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--multi", action="store_true", help="appends of 1-3 events, not just 1")
    parser.add_argument("--pause-after", type=int, help="wait for a stdin line after this many appends")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
