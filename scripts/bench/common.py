"""What the benchmarks share: the subcommand registry, options, printing, and filling a log."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path

import psutil

from events import Meta, open_log
from projections.readmodels import read_models

from . import raw_postgres

COMMANDS: dict[str, tuple[Callable, str, tuple]] = {}

FILL_TIMEOUT = 600.0


def command(name: str, help: str, *arguments: tuple[tuple[str, ...], dict]):
    """Registers a subcommand: `arguments` are (flags, add_argument keywords) pairs."""

    def register(fn: Callable) -> Callable:
        COMMANDS[name] = (fn, help, arguments)
        return fn

    return register


def events_option(default: int) -> tuple[tuple[str, ...], dict]:
    return ("--events",), {"type": int, "default": default, "help": f"how many events (default {default:,})"}


DIR_OPTION = (("--dir",), {"type": Path, "help": "where to put the database files (default: a temporary dir)"})


def database_options(default: str = "sqlite") -> tuple[tuple[tuple[str, ...], dict], ...]:
    """--backend and --database: the log a benchmark runs on (see `database`)."""
    return (
        (("--backend",), {"choices": ("sqlite", "postgres"), "default": default,
                          "help": f"the log's backend (default {default}); postgres without --database makes a "
                                  f"database of its own on {raw_postgres.POSTGRES_SERVER} and drops it after"}),
        (("--database",), {"metavar": "URL", "help": "an empty PostgreSQL database to run on (implies --backend "
                                                     "postgres; the benchmark's log is left in it)"}),
    )


@contextlib.contextmanager
def database(args) -> Iterator[str | None]:
    """The PostgreSQL database of --database or --backend postgres (see `database_options`), or
    None for SQLite."""
    if args.database:
        raw_postgres.require_empty(args.database)
        yield args.database
    elif args.backend == "postgres":
        with raw_postgres.fresh_database() as url:
            yield url
    else:
        yield None


@contextlib.contextmanager
def workdir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
    else:
        with tempfile.TemporaryDirectory(prefix="mc-bench-") as tmp:
            yield Path(tmp)


# --- printing -----------------------------------------------------------------------------------


def line(label: str, value: str, note: str = "", widths: tuple[int, int] = (34, 16)) -> None:
    print(f"  {label:<{widths[0]}}{value:>{widths[1]}}   {note}".rstrip(), flush=True)


def target(wanted: str, met: bool) -> str:
    return f"target {wanted}: {'met' if met else 'NOT met'}"


def rate(label: str, count: int, seconds: float) -> float:
    per_second = count / seconds
    line(label, f"{per_second:,.0f} ev/s", f"({count:,} in {seconds:.2f} s)")
    return per_second


def ratio(value: float, at_least: float | None) -> None:
    """`value`, and whether it meets the target `at_least` (None: no target, a figure to note)."""
    verdict = "" if at_least is None else f"({target(f'>= {at_least:.2f}', value >= at_least)})"
    line("ratio", f"{value:.3f}", verdict)


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"


def rss() -> int:
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


# --- filling a log through its API ------------------------------------------------------------


async def fill_log(path: Path, appends: Iterable[tuple[str, list]], round_size: int = 10_000) -> None:
    """Appends each (stream, events) of `appends` to a new stream, `round_size` appends at once
    (group commit makes a round a few transactions), with the read models projected in the same
    transactions, exactly as the service keeps them. Bounded by FILL_TIMEOUT."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open_log(str(path), durable=False)
    models = read_models(log)
    await log.open()
    try:
        await models.prepare()
        meta = Meta(actor="bench")
        deadline = time.monotonic() + FILL_TIMEOUT
        appends = iter(appends)
        while batch := list(islice(appends, round_size)):
            if time.monotonic() > deadline:
                raise SystemExit(f"filling {path} took over {FILL_TIMEOUT:.0f} s")
            await asyncio.gather(*(log.append(stream, events, expected=0, meta=meta) for stream, events in batch))
    finally:
        await log.close()
