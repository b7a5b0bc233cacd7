"""`bench.py verify`: how fast the auditor's walks go over a large log.

verify: events.verify.verify_chain (read_all pages, positions, versions, hash, canonical
form) against its floor, a raw scan hashing the same canonical bytes.
rebuild: ReadModels.rebuild (drop every read model, refold from the log).
"""

from __future__ import annotations

import argparse
import time

from events.sqlite import SqliteLog
from events.verify import verify_chain
from projections.readmodels import read_models

from . import raw_sqlite
from .common import DIR_OPTION, command, events_option, line, mib, rate, ratio, workdir


@command("verify", "verify_chain and rebuild over a large log, against a raw hashing scan",
         events_option(1_000_000), DIR_OPTION)
async def bench_verify(args: argparse.Namespace) -> None:
    count = args.events
    print(f"verify: {count:,} small events ({raw_sqlite.TASK_EVENTS} per task stream), chain checked, "
          "then every read model rebuilt")
    with workdir(args.dir) as where:
        path = where / "verify.db"
        started = time.perf_counter()
        raw_sqlite.fill(str(path), count)
        line("filled (raw executemany)", f"{time.perf_counter() - started:.1f} s", mib(path.stat().st_size))

        log = SqliteLog(path, durable=False)
        models = read_models(log)
        await log.open()
        try:
            started = time.perf_counter()
            report = await verify_chain(log)
            verified = time.perf_counter() - started
            assert report.ok and report.checked == count, report

            started = time.perf_counter()
            folded = await models.rebuild()
            rebuilt = time.perf_counter() - started
            assert folded == count, f"rebuilt from {folded:,} events, not {count:,}"
        finally:
            await log.close()

        started = time.perf_counter()
        raw_sqlite.hash_chain(path)
        raw = time.perf_counter() - started

    verify_rate = rate("verify_chain", count, verified)
    raw_rate = rate("raw scan + sha256", count, raw)
    ratio(verify_rate / raw_rate, 0.3)
    rate("rebuild (drop + refold)", count, rebuilt)
