"""`bench.py replay`: fold the whole log through read_all + decode against a raw scan."""

from __future__ import annotations

import argparse
import multiprocessing
import time
from collections import Counter

from events import decode
from events.sqlite import SqliteLog
from events.types import TaskOutput

from . import raw_sqlite
from .common import DIR_OPTION, command, events_option, line, mib, peak_rss, rate, ratio, rss, workdir


@command(
    "replay", "fold the whole log through read_all + decode vs a raw scan + untyped decode",
    events_option(1_000_000),
    (("--page",), {"type": int, "default": 5000, "help": "read_all page size (default 5,000, the API's max)"}),
    DIR_OPTION,
)
async def bench_replay(args: argparse.Namespace) -> None:
    count = args.events
    checkpoint = max(1, count // 4)
    print(f"replay: {count:,} small events ({raw_sqlite.TASK_EVENTS} per task stream), folded into counts by type")
    with workdir(args.dir) as where:
        path = where / "replay.db"
        started = time.perf_counter()
        # In a child of its own, so the filling's memory does not count against the fold measured after.
        filler = multiprocessing.get_context("spawn").Process(target=raw_sqlite.fill, args=(str(path), count))
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

        started = time.perf_counter()
        raw_counts, raw_chars = raw_sqlite.fold(path)
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
