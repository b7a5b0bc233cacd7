"""Benchmarks of Mission Control, each against the floor it stands on: `scripts/bench.py SUB`.

One module per subcommand (append, replay, verify, http, sse, run), each registering itself
with `common.command`; `common` holds what they share, `raw_sqlite` every raw SQLite floor,
and `tests/server.py` starts every server they measure, as it does for the tests.
"""
