"""`python -m scripts.bench SUB` (or `scripts/bench.py SUB`): run one benchmark."""

from __future__ import annotations

import argparse
import asyncio
import inspect

from . import append, artifacts, desktops, http_api, http_nodes, notify, processes, queue, replay, run, sse, verify  # noqa: F401  (each registers its subcommand)
from .common import COMMANDS

USAGE = """Benchmarks of Mission Control, each against the raw floor it stands on. Loopback and local files only.

    .venv/bin/python scripts/bench.py append [--events 100000] [--appenders 1000]
    .venv/bin/python scripts/bench.py append --backend postgres   (or --database URL: an empty database)
    .venv/bin/python scripts/bench.py sse --nodes 2 --backend postgres
    .venv/bin/python scripts/bench.py http-nodes [--duration 5] [--rounds 3]
    .venv/bin/python scripts/bench.py replay [--events 1000000]
    .venv/bin/python scripts/bench.py notify [--tasks 300]
    .venv/bin/python scripts/bench.py artifacts [--mib 64] [--backend postgres]

A subcommand is one function registered with @command; it prints its own figures.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
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
