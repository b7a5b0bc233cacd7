"""`scripts/bench.py verify`: how fast the auditor's walks go over a large log.

    .venv/bin/python scripts/bench.py verify [--events 1000000]

verify: events.verify.verify_chain (read_all pages, positions, versions, hash, canonical
form) against its floor, a raw scan hashing the same canonical bytes.
rebuild: ReadModels.rebuild (drop every read model, refold from the log).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import sqlite3
import time

from bench import DIR_OPTION, _fill, command, events_option, line, mib, rate, ratio, workdir
from events.sqlite import SqliteLog
from events.verify import verify_chain
from projections.readmodels import read_models


@command("verify", "verify_chain and rebuild over a large log, against a raw hashing scan",
         events_option(1_000_000), DIR_OPTION)
async def bench_verify(args: argparse.Namespace) -> None:
    count = args.events
    print(f"verify: {count:,} small events (10 per task stream), chain checked, then every read model rebuilt")
    with workdir(args.dir) as where:
        path = where / "verify.db"
        started = time.perf_counter()
        _fill(str(path), count)
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

        # The floor of verify: one raw scan hashing the very bytes the chain covers.
        started = time.perf_counter()
        with contextlib.closing(sqlite3.connect(path)) as conn:
            rows = conn.execute(
                "SELECT meta, payload, position, recorded_at, stream, type, version FROM events ORDER BY position"
            )
            for meta, payload, position, recorded_at, stream, type_, version in rows:
                hashlib.sha256(
                    b'{"meta":%s,"payload":%s,"position":%d,"recordedAt":"%s","stream":"%s","type":"%s","version":%d}'
                    % (meta, payload, position, recorded_at.encode(), stream.encode(), type_.encode(), version)
                ).hexdigest()
        raw = time.perf_counter() - started

    verify_rate = rate("verify_chain", count, verified)
    raw_rate = rate("raw scan + sha256", count, raw)
    ratio(verify_rate / raw_rate, 0.3)
    rate("rebuild (drop + refold)", count, rebuilt)
